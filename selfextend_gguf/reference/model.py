"""Reference decoder for llama- and qwen2-architecture GGUF files, in plain torch.

    token_embd -> n_layer x [ x += attn(rms_norm(x)); x += swiglu(rms_norm(x)) ] -> rms_norm -> output

qwen2 is llama plus biases on the Q, K and V projections (added before RoPE) and NeoX-layout
RoPE; any llama.cpp GGUF may carry those biases (attn_{q,k,v}.bias), so both load them if present.

Two ways to run it, which must agree:
    model.forward(tokens, mode=...)       prefill: the whole sequence at once, no cache
    model.decode(tokens, cache)           incremental: append tokens to a KVCache, logits for them

Usage:
    model = ReferenceModel.from_gguf("model.gguf", dtype=torch.float64)
    logits = model.forward(tokens, mode="self_extend", group_size=4, window=32)   # [n, n_vocab]
    cache = model.new_cache(mode="self_extend", group_size=4, window=32)
    first = model.decode(tokens[:10], cache); nxt = model.decode(tokens[10:11], cache)
    cache.truncate(5)  # rewind to position 5, like llama_memory_seq_rm(mem, seq, 5, -1)
"""
import copy
from dataclasses import dataclass, fields
from typing import List, Optional

import torch
import torch.nn.functional as F

from .attention import (LLAMA_CPP_DEFAULT_N_BATCH, AttentionMode, chunked_attention,
                        self_extend_attention, vanilla_attention)
from .gguf_loader import LlamaHParams, TensorTaker, architecture, load_llama_gguf, open_gguf
from .positions import completion_kv_shift
from .rope import Rope


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [n_embd]
    wq: torch.Tensor         # [n_head * head_dim, n_embd]
    wk: torch.Tensor         # [n_head_kv * head_dim, n_embd]
    wv: torch.Tensor         # [n_head_kv * head_dim, n_embd]
    wo: torch.Tensor         # [n_embd, n_head * head_dim]
    ffn_norm: torch.Tensor   # [n_embd]
    w_gate: torch.Tensor     # [n_ff, n_embd]
    w_up: torch.Tensor       # [n_ff, n_embd]
    w_down: torch.Tensor     # [n_embd, n_ff]
    bq: Optional[torch.Tensor] = None  # [n_head * head_dim]     (qwen2; None: no bias)
    bk: Optional[torch.Tensor] = None  # [n_head_kv * head_dim]
    bv: Optional[torch.Tensor] = None  # [n_head_kv * head_dim]

    def to(self, dtype):
        """A copy with every tensor cast to dtype (absent biases stay None)."""
        cast = {f.name: getattr(self, f.name) for f in fields(self)}
        return LayerWeights(**{name: None if t is None else t.to(dtype) for name, t in cast.items()})


class KVCache:
    """One sequence's KV cache, llama.cpp style: per layer the keys (before RoPE) and values,
    plus each cell's recorded position (cell_pos: masking, where the next token goes) and the
    position its key is rotated to (rope_pos; equal to cell_pos except after llama.cpp's buggy
    seq_div, see positions.completion_kv_shift). RoPE is applied at attention time, so
    rewriting the positions (chunked mode) is llama.cpp's K-shift.
    Independent sequences are independent KVCache objects; copy() forks one.
    """

    def __init__(self, n_layer, mode: AttentionMode):
        self.mode = mode
        self.k: List[Optional[torch.Tensor]] = [None] * n_layer  # [n_head_kv, n_cells, head_dim]
        self.v: List[Optional[torch.Tensor]] = [None] * n_layer  # [n_head_kv, n_cells, head_dim]
        self.cell_pos = torch.zeros(0, dtype=torch.long)         # [n_cells] recorded positions
        self.rope_pos = torch.zeros(0, dtype=torch.long)         # [n_cells] positions K is rotated to
        self.n_past = 0  # position given to the next token
        self.ga_i = 0    # llama-completion's count of grouped positions (chunked mode)

    def __len__(self):
        return self.cell_pos.numel()

    def copy(self):
        return copy.deepcopy(self)

    def truncate(self, n_keep):
        """Drop the cells at positions >= n_keep; the next token goes to position n_keep."""
        if self.mode.name == "chunked":
            raise ValueError("a chunked-mode cache cannot be rewound: its positions are compressed")
        if n_keep < 0:
            raise ValueError(f"n_keep must be >= 0, got {n_keep}")
        keep = self.cell_pos < n_keep
        self.k = [None if k is None else k[:, keep] for k in self.k]
        self.v = [None if v is None else v[:, keep] for v in self.v]
        self.cell_pos, self.rope_pos = self.cell_pos[keep], self.rope_pos[keep]
        self.n_past = min(self.n_past, n_keep)

    def append(self, layer, k, v):
        """Add this layer's new keys/values; returns all of the layer's cached keys/values."""
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=1)
            v = torch.cat((self.v[layer], v), dim=1)
        self.k[layer], self.v[layer] = k, v
        return k, v


def rms_norm(x, weight, eps):
    """[n, n_embd] -> [n, n_embd]: x / sqrt(mean(x^2) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x, weight, bias=None):
    """[n, n_in] -> [n, n_out]: x @ weight.T, plus bias [n_out] if given."""
    y = x @ weight.T
    return y if bias is None else y + bias


def swiglu(x, w: LayerWeights):
    return (F.silu(x @ w.w_gate.T) * (x @ w.w_up.T)) @ w.w_down.T


class ReferenceModel:
    def __init__(self, hparams: LlamaHParams, tok_embd, layers, output_norm, output, rope, dtype):
        self.hparams = hparams
        self.tok_embd = tok_embd        # [n_vocab, n_embd]
        self.layers = layers            # n_layer x LayerWeights
        self.output_norm = output_norm  # [n_embd]
        self.output = output            # [n_vocab, n_embd], the token embedding if tied
        self.rope = rope
        self.dtype = dtype

    @classmethod
    def from_gguf(cls, path, dtype=torch.float64):
        """Load any llama- or qwen2-architecture GGUF; every quant type the gguf package knows is
        dequantized."""
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if architecture(open_gguf(path)) == "gemma3":  # a Gemma3Model (a subclass) for Gemma 3
            from .gemma3 import Gemma3Model  # imported here: gemma3.py builds on this module
            return Gemma3Model.from_gguf(path, dtype)
        hp, arrays = load_llama_gguf(path)
        take = TensorTaker(arrays, path, dtype)
        take_optional = take.optional

        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        layers = [LayerWeights(
            attn_norm=take(f"blk.{i}.attn_norm.weight", (hp.n_embd,)),
            wq=take(f"blk.{i}.attn_q.weight", (q_dim, hp.n_embd)),
            wk=take(f"blk.{i}.attn_k.weight", (kv_dim, hp.n_embd)),
            wv=take(f"blk.{i}.attn_v.weight", (kv_dim, hp.n_embd)),
            wo=take(f"blk.{i}.attn_output.weight", (hp.n_embd, q_dim)),
            ffn_norm=take(f"blk.{i}.ffn_norm.weight", (hp.n_embd,)),
            w_gate=take(f"blk.{i}.ffn_gate.weight", (hp.n_ff, hp.n_embd)),
            w_up=take(f"blk.{i}.ffn_up.weight", (hp.n_ff, hp.n_embd)),
            w_down=take(f"blk.{i}.ffn_down.weight", (hp.n_embd, hp.n_ff)),
            bq=take_optional(f"blk.{i}.attn_q.bias", (q_dim,)),
            bk=take_optional(f"blk.{i}.attn_k.bias", (kv_dim,)),
            bv=take_optional(f"blk.{i}.attn_v.bias", (kv_dim,)),
        ) for i in range(hp.n_layer)]
        tok_embd = take("token_embd.weight", (hp.n_vocab, hp.n_embd))
        output_norm = take("output_norm.weight", (hp.n_embd,))
        output = take("output.weight", (hp.n_vocab, hp.n_embd)) if "output.weight" in arrays else tok_embd
        freq_factors = None
        if "rope_freqs.weight" in arrays:
            freq_factors = take("rope_freqs.weight", (hp.rope_dims // 2,)).to(torch.float64)
        take.check_all_taken("the reference decoder")
        rope = Rope(n_dims=hp.rope_dims, base=hp.rope_base, freq_scale=hp.rope_freq_scale,
                    neox=hp.rope_neox, freq_factors=freq_factors)  # llama NORM, qwen2 NEOX
        return cls(hp, tok_embd, layers, output_norm, output, rope, dtype)

    def to(self, dtype):
        """A copy with the weights cast to dtype (float32 <-> float64 is exact for GGUF weights)."""
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        layers = [w.to(dtype) for w in self.layers]
        tok_embd = self.tok_embd.to(dtype)
        output = tok_embd if self.output is self.tok_embd else self.output.to(dtype)
        return ReferenceModel(self.hparams, tok_embd, layers, self.output_norm.to(dtype), output,
                              self.rope, dtype)

    @property
    def tied_output(self):
        return self.output is self.tok_embd

    # ------------------------------------------------------------------ shared pieces

    def block(self, w: LayerWeights, x, attend):
        """One transformer block; attend(q, k, v) does the attention of this layer."""
        hp, n = self.hparams, x.shape[0]
        h = rms_norm(x, w.attn_norm, hp.rms_eps)                               # [n, n_embd]
        q = linear(h, w.wq, w.bq).view(n, hp.n_head, hp.head_dim).transpose(0, 1)      # [n_head, n, d]
        k = linear(h, w.wk, w.bk).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)   # [n_head_kv, n, d]
        v = linear(h, w.wv, w.bv).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)   # [n_head_kv, n, d]
        a = attend(q, k, v).transpose(0, 1).reshape(n, hp.n_head * hp.head_dim)
        x = x + a @ w.wo.T
        return x + swiglu(rms_norm(x, w.ffn_norm, hp.rms_eps), w)

    def embed(self, tokens):
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if tokens.numel() == 0:
            raise ValueError("tokens must not be empty")
        if tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.hparams.n_vocab})")
        return self.tok_embd[tokens]                                           # [n, n_embd]

    def logits(self, x):
        return rms_norm(x, self.output_norm, self.hparams.rms_eps) @ self.output.T  # [n, n_vocab]

    @staticmethod
    def attention_mode(mode="vanilla", group_size=1, window=None,
                       n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False):
        if isinstance(mode, AttentionMode):
            return mode
        return AttentionMode(mode, group_size, window, n_batch, pos_div_sign_bug)

    # ------------------------------------------------------------------ prefill

    def forward(self, tokens, mode="vanilla", group_size=1, window=None,
                n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False):
        """Logits [n, n_vocab] for every position of tokens (positions 0..n-1), without a cache.

        mode: "vanilla", "self_extend" (exact, needs group_size and window) or "chunked"
        (llama-completion's --grp-attn-n/--grp-attn-w with -b n_batch; pos_div_sign_bug=True
        reproduces the pinned llama.cpp's K-shift sign error), or an AttentionMode.
        """
        mode = self.attention_mode(mode, group_size, window, n_batch, pos_div_sign_bug)
        x = self.embed(tokens)
        pos = torch.arange(x.shape[0])
        G, W = mode.group_size, mode.window

        def attend(q, k, v):
            if mode.name == "self_extend":
                return self_extend_attention(q, k, v, pos, pos, G, W, self.rope)
            if mode.name == "chunked":
                return chunked_attention(q, k, v, G, W, self.rope, n_batch=mode.n_batch,
                                         pos_div_sign_bug=mode.pos_div_sign_bug)
            return vanilla_attention(q, k, v, pos, pos, self.rope)

        for w in self.layers:
            x = self.block(w, x, attend)
        return self.logits(x)

    __call__ = forward

    # ------------------------------------------------------------------ incremental decode

    def new_cache(self, mode="vanilla", group_size=1, window=None,
                  n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False):
        """An empty KVCache; decode() takes the attention mode from it."""
        mode = self.attention_mode(mode, group_size, window, n_batch, pos_div_sign_bug)
        return KVCache(self.hparams.n_layer, mode)

    def decode(self, tokens, cache: KVCache):
        """Append tokens to cache at positions cache.n_past.. and return their logits [n, n_vocab].

        In chunked mode one call is one llama-completion batch (mode.n_batch is not used here:
        decode_in_batches splits): the cache positions are first compressed exactly as
        llama-completion does before it calls llama_decode.
        """
        mode = cache.mode
        x = self.embed(tokens)
        if mode.name == "chunked":
            cache.cell_pos, cache.rope_pos, cache.n_past, cache.ga_i = completion_kv_shift(
                cache.cell_pos, cache.rope_pos, cache.n_past, cache.ga_i, mode.group_size,
                mode.window, mode.pos_div_sign_bug)
        q_pos = cache.n_past + torch.arange(x.shape[0])                        # [n]
        k_pos = torch.cat((cache.cell_pos, q_pos))                             # [n_cells + n]
        k_rope_pos = torch.cat((cache.rope_pos, q_pos))                        # [n_cells + n]

        for i, w in enumerate(self.layers):
            def attend(q, k, v, i=i):
                k, v = cache.append(i, k, v)
                if mode.name == "self_extend":
                    return self_extend_attention(q, k, v, q_pos, k_pos, mode.group_size,
                                                 mode.window, self.rope)
                return vanilla_attention(q, k, v, q_pos, k_pos, self.rope, k_rope_pos=k_rope_pos)
            x = self.block(w, x, attend)

        cache.cell_pos, cache.rope_pos = k_pos, k_rope_pos
        cache.n_past += x.shape[0]
        return self.logits(x)

    def decode_in_batches(self, tokens, cache: KVCache, n_batch):
        """decode() the tokens n_batch at a time (as llama.cpp callers do); logits [n, n_vocab]."""
        return torch.cat([self.decode(tokens[i:i + n_batch], cache)
                          for i in range(0, len(tokens), n_batch)])
