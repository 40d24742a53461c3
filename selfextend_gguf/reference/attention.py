"""Causal attention with RoPE: vanilla, exact Self-Extend, and llama-completion's chunked variant;
layer_attention, the one a decoder layer calls (optionally within a sliding window).

All functions take q, k, v as projected BEFORE RoPE, one sequence, heads first:
    q: [n_head, n_q, head_dim]    k, v: [n_head_kv, n_k, head_dim]    (n_head % n_head_kv == 0)
    q_pos: [n_q], k_pos: [n_k] integer positions
and return [n_head, n_q, head_dim]. Query head h reads key/value head h // (n_head / n_head_kv),
as llama.cpp and transformers do. A key is visible to a query when k_pos <= q_pos (and, with
sliding_window = n_swa > 0, q_pos - k_pos < n_swa).
Float32 and float64 inputs are computed in their own dtype.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .positions import (causal_mask, check_chunked_args, check_group_args, chunked_positions,
                        chunked_rope_positions, grouped_key_position, grouped_query_position,
                        neighbor_mask)
from .rope import Rope

MODES = ("vanilla", "self_extend", "chunked")
LLAMA_CPP_DEFAULT_N_BATCH = 2048  # llama-completion's default -b


@dataclass(frozen=True)
class AttentionMode:
    """Which attention a decoder uses. group_size/window are ignored by "vanilla".

    n_batch (chunked only): llama-completion feeds the prompt in batches of n_batch tokens
    and compresses the KV cache only between batches.
    pos_div_sign_bug (chunked only): reproduce the pinned llama.cpp's K-shift sign error
    after llama_memory_seq_div (see positions.completion_kv_shift).
    """
    name: str = "vanilla"
    group_size: int = 1
    window: Optional[int] = None
    n_batch: int = LLAMA_CPP_DEFAULT_N_BATCH
    pos_div_sign_bug: bool = False

    def __post_init__(self):
        if self.name not in MODES:
            raise ValueError(f"unknown attention mode {self.name!r}; expected one of {MODES}")
        if self.name == "self_extend":
            check_group_args(self.group_size, self.window)
        if self.name == "chunked":
            check_chunked_args(self.group_size, self.window, self.n_batch)


def default_rope(head_dim):
    return Rope(n_dims=head_dim)


def expand_kv_heads(x, n_head):
    """[n_head_kv, n, d] -> [n_head, n, d]: each kv head serves n_head / n_head_kv query heads."""
    if n_head % x.shape[0]:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({x.shape[0]})")
    return x.repeat_interleave(n_head // x.shape[0], dim=0)


def rotated_scores(q, k, q_pos, k_pos, rope, scale):
    """[n_head, n_q, n_k] scaled dot products of q and k rotated to the given positions."""
    q = rope(q, q_pos)                                    # [n_head, n_q, d]
    k = expand_kv_heads(rope(k, k_pos), q.shape[0])       # [n_head, n_k, d]
    return (q @ k.transpose(-2, -1)) * scale


def soft_cap(scores, cap):
    """Attention logit soft-capping (Gemma 2): cap * tanh(scores / cap), on every score (grouped and
    neighbor alike) before the mask; scores unchanged where cap is 0."""
    return torch.tanh(scores / cap) * cap if cap else scores


def softmax_attend(scores, visible, v):
    """One softmax over the visible keys of each query, then the weighted sum of values."""
    scores = scores.masked_fill(~visible, float("-inf"))  # [n_head, n_q, n_k]
    probs = torch.softmax(scores, dim=-1)
    return probs @ expand_kv_heads(v, scores.shape[0])    # [n_head, n_q, d]


def sliding_window_mask(q_pos, k_pos, sliding_window):
    """[n_q, n_k] bool, True where q - k < n_swa (llama.cpp's LLAMA_SWA_TYPE_STANDARD, is_masked_swa)."""
    return neighbor_mask(q_pos, k_pos, sliding_window)  # the same test as the neighbor window's


def visible_mask(q_pos, k_pos, sliding_window=0):
    """[n_q, n_k] bool: the causal mask, within the sliding window if sliding_window > 0."""
    visible = causal_mask(q_pos, k_pos)
    return visible & sliding_window_mask(q_pos, k_pos, sliding_window) if sliding_window else visible


def vanilla_attention(q, k, v, q_pos, k_pos, rope=None, scale=None, k_rope_pos=None, sliding_window=0, softcap=0.0):
    """Standard causal RoPE attention at the given positions.

    k_rope_pos: rotate the keys to these positions instead of k_pos (masking still uses
    k_pos); models a llama.cpp KV cache whose K-shift disagrees with its recorded positions.
    """
    rope = rope or default_rope(q.shape[-1])
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k_rope_pos = k_pos if k_rope_pos is None else k_rope_pos
    scores = soft_cap(rotated_scores(q, k, q_pos, k_rope_pos, rope, scale), softcap)
    return softmax_attend(scores, visible_mask(q_pos, k_pos, sliding_window), v)


def self_extend_attention(q, k, v, q_pos, k_pos, group_size, window, rope=None, scale=None, sliding_window=0,
                          softcap=0.0):
    """Exact Self-Extend (bi-level attention, paper Algorithm 1).

    Each (query, key) pair takes its score from one of two RoPE attentions:
      neighbor, q - k < window:  query rotated to q,                                key to k
      grouped,  q - k >= window: query rotated to q // group_size + window - window // group_size,
                                 key rotated to k // group_size
    The two score matrices are merged by replacement, causally masked, and normalised by
    one softmax.
    """
    check_group_args(group_size, window)
    rope = rope or default_rope(q.shape[-1])
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = soft_cap(self_extend_scores(q, k, q_pos, k_pos, group_size, window, rope, scale), softcap)
    return softmax_attend(scores, visible_mask(q_pos, k_pos, sliding_window), v)


def layer_attention(q, k, v, q_pos, k_pos, rope, scale, sliding_window=0, group_size=1, window=None,
                    k_rope_pos=None, softcap=0.0):
    """One decoder layer's attention: exact Self-Extend where group_size > 1, vanilla otherwise
    (keys rotated to k_rope_pos if given); sliding_window > 0 also hides keys with q - k >= it;
    softcap > 0 soft-caps the scores (soft_cap)."""
    if group_size > 1:
        return self_extend_attention(q, k, v, q_pos, k_pos, group_size, window, rope, scale, sliding_window, softcap)
    return vanilla_attention(q, k, v, q_pos, k_pos, rope, scale, k_rope_pos, sliding_window, softcap)


def self_extend_scores(q, k, q_pos, k_pos, group_size, window, rope, scale):
    """[n_head, n_q, n_k] Self-Extend scores before masking: the neighbor score where q - k < W,
    the grouped score elsewhere (see self_extend_attention)."""
    neighbor = rotated_scores(q, k, q_pos, k_pos, rope, scale)
    grouped = rotated_scores(q, k, grouped_query_position(q_pos, group_size, window),
                             grouped_key_position(k_pos, group_size), rope, scale)
    return torch.where(neighbor_mask(q_pos, k_pos, window), neighbor, grouped)


def chunked_attention(q, k, v, group_size, window, rope=None, scale=None,
                      n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False, softcap=0.0):
    """What `llama-completion --grp-attn-n G --grp-attn-w W -b n_batch` computes for a prompt.

    q, k, v hold tokens 0..n-1 of one sequence decoded from an empty KV cache in batches of
    n_batch tokens. Before each batch llama-completion rewrites the positions of the cached
    keys with llama_memory_seq_add / llama_memory_seq_div (see positions.completion_kv_shift);
    llama.cpp then re-rotates the cached K to the new positions (K-shift), places the batch
    at the next positions, and runs ordinary causal RoPE attention. Here a batch starting at
    token s sees every token t <= its own at positions.chunked_positions(t, s, G, W), and K is
    rotated directly from its un-rotated projection to that position (RoPE composes, so this
    equals llama.cpp's rotate-then-shift up to rounding).
    pos_div_sign_bug=True rotates compressed keys to 2t - t // G instead, as the pinned
    llama.cpp does (positions.completion_kv_shift explains).
    Note: a prompt that fits in one batch is not compressed at all (vanilla attention).
    """
    check_chunked_args(group_size, window, n_batch)
    n = q.shape[1]
    token = torch.arange(n)
    outputs = []
    for start in range(0, n, n_batch):
        stop = min(start + n_batch, n)
        pos = chunked_positions(token[:stop], start, group_size, window)   # [stop]
        rope_pos = chunked_rope_positions(token[:stop], start, group_size, window,
                                          pos_div_sign_bug)                 # [stop]
        outputs.append(vanilla_attention(q[:, start:stop], k[:, :stop], v[:, :stop],
                                         pos[start:stop], pos, rope, scale, k_rope_pos=rope_pos,
                                         softcap=softcap))
    return torch.cat(outputs, dim=1)                                       # [n_head, n, d]
