"""Gemma 3 (GGUF architecture "gemma3") in the torch reference, with Self-Extend on its global layers.

    x = token_embd[tokens] * sqrt(n_embd)
    n_layer x [ x += post_attention_norm(attn(attn_norm(x)))
                x += post_ffw_norm(geglu(ffn_norm(x))) ]
    logits = output_norm(x) @ token_embd.T          (tied output; softcapped if the file says so)

as llama.cpp's src/models/gemma3.cpp computes it: Q and K get a per-head RMSNorm (attn_q_norm,
attn_k_norm) before NeoX RoPE, scores are scaled by 1/sqrt(head_dim) (27B: 1/sqrt(n_embd / n_head)),
the FFN is GELU(tanh)-gated.
Norm weights are used as stored: the HF -> GGUF converter already wrote Gemma's (1 + w).
Layers are of two kinds (llama.cpp's iSWA KV cache):

    sliding-window layer: key visible iff 0 <= q - k < n_swa   RoPE base rope.freq_base_swa
    global layer:         key visible iff 0 <= q - k           RoPE base rope.freq_base (and scaling)

mode="self_extend" applies Self-Extend to the global layers only and leaves the sliding-window
layers at their normal positions, as the patched llama.cpp does. That is exact when W >= n_swa: a
sliding-window layer sees only keys with q - k < n_swa <= W, which Self-Extend keeps at their
normal positions anyway. self_extend_sliding=True applies it to every layer instead, to check that
claim (same logits when W >= n_swa, different ones when W < n_swa).

ffn_gelu="ggml_cpu" reproduces llama.cpp's CPU GELU (see gelu_ggml_cpu), "tanh" (default) is the
exact formula, as transformers computes it.
"""
import math
from dataclasses import dataclass, fields
from typing import Tuple

import torch
import torch.nn.functional as F

from .attention import (LLAMA_CPP_DEFAULT_N_BATCH, rotated_scores, self_extend_scores,
                        softmax_attend)
from ..gguf_info import field
from .gguf_loader import (GGUFError, LlamaHParams, TensorTaker, architecture, open_gguf, read_tensors,
                          supported_rope_freq_scale)
from .model import KVCache, ReferenceModel, rms_norm
from .positions import causal_mask
from .rope import Rope

ARCHITECTURE = "gemma3"
DEFAULT_SWA_PATTERN = 6      # llama.cpp: load_swa_pattern(ml, 6), every 6th layer global
DEFAULT_ROPE_BASE_SWA = 10000.0


@dataclass(frozen=True)
class Gemma3HParams(LlamaHParams):
    sliding_window: int = 0                 # n_swa; 0: no sliding-window layers
    swa_layers: Tuple[bool, ...] = ()       # per layer, True for a sliding-window layer
    rope_base_swa: float = DEFAULT_ROPE_BASE_SWA
    attention_scale: float = 1.0            # llama.cpp's f_attention_scale
    final_logit_softcapping: float = 0.0    # 0: none
    architecture: str = ARCHITECTURE

    @property
    def rope_neox(self) -> bool:
        return True  # llama_model_rope_type: LLM_ARCH_GEMMA3 -> LLAMA_ROPE_TYPE_NEOX


@dataclass
class Gemma3LayerWeights:
    attn_norm: torch.Tensor       # [n_embd]
    wq: torch.Tensor              # [n_head * head_dim, n_embd]
    q_norm: torch.Tensor          # [head_dim]
    wk: torch.Tensor              # [n_head_kv * head_dim, n_embd]
    k_norm: torch.Tensor          # [head_dim]
    wv: torch.Tensor              # [n_head_kv * head_dim, n_embd]
    wo: torch.Tensor              # [n_embd, n_head * head_dim]
    post_attn_norm: torch.Tensor  # [n_embd]
    ffn_norm: torch.Tensor        # [n_embd]
    w_gate: torch.Tensor          # [n_ff, n_embd]
    w_up: torch.Tensor            # [n_ff, n_embd]
    w_down: torch.Tensor          # [n_embd, n_ff]
    post_ffn_norm: torch.Tensor   # [n_embd]

    def to(self, dtype):
        return Gemma3LayerWeights(**{f.name: getattr(self, f.name).to(dtype) for f in fields(self)})


# ----------------------------------------------------------------------------- hyperparameters

def sliding_layers(n_layer, sliding_window, pattern):
    """Per layer, True for a sliding-window layer, as llama.cpp's load_swa_pattern decides.

    pattern: the {arch}.attention.sliding_window_pattern value: absent (None) -> 6; an int n ->
    layer i slides iff i % n < n - 1 (every n-th layer is global; 0: every layer slides); a list
    of bools -> as listed. Without a sliding window (0) no layer slides.
    """
    if not sliding_window:
        return (False,) * n_layer
    if isinstance(pattern, list):
        if len(pattern) < n_layer:
            raise GGUFError(f"sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return tuple(bool(p) for p in pattern[:n_layer])
    n = DEFAULT_SWA_PATTERN if pattern is None else int(pattern)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


def read_gemma3_hparams(reader, path=""):
    """Gemma3HParams from the gemma3.* metadata keys (as llama.cpp's llama_model_gemma3 reads them)."""
    arch = architecture(reader)
    if arch != ARCHITECTURE:
        raise GGUFError(f"{path}: architecture {arch!r} is not {ARCHITECTURE!r}")

    def value(key, default=None, required=False):
        v = field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise GGUFError(f"{path}: missing metadata key {arch}.{key}")
        return v

    n_embd, n_head = int(value("embedding_length", required=True)), int(value("attention.head_count", required=True))
    n_layer = int(value("block_count", required=True))
    head_dim = int(value("attention.key_length", n_embd // n_head))
    if int(value("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: key_length != value_length is not supported")
    rope_freq_scale = supported_rope_freq_scale(reader, arch, path)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFError(f"{path}: missing tensor token_embd.weight")
    sliding_window = int(value("attention.sliding_window", 0) or 0)
    # gemma3.cpp: the 27B model (62 layers) scales by 1/sqrt(n_embd / n_head), the others 1/sqrt(head_dim)
    attention_dim = n_embd // n_head if n_layer == 62 else head_dim
    return Gemma3HParams(
        n_vocab=int(value("vocab_size", int(embd.shape[1]))),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=int(value("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(value("feed_forward_length", required=True)),
        n_ctx_train=int(value("context_length", required=True)),
        rms_eps=float(value("attention.layer_norm_rms_epsilon", required=True)),
        rope_dims=int(value("rope.dimension_count", head_dim)),
        rope_base=float(value("rope.freq_base", 10000.0)),
        rope_freq_scale=rope_freq_scale,
        sliding_window=sliding_window,
        swa_layers=sliding_layers(n_layer, sliding_window, value("attention.sliding_window_pattern")),
        rope_base_swa=float(value("rope.freq_base_swa", DEFAULT_ROPE_BASE_SWA)),
        attention_scale=1.0 / math.sqrt(attention_dim),
        final_logit_softcapping=float(value("final_logit_softcapping", 0.0) or 0.0),
    )


# ----------------------------------------------------------------------------- pieces

def gelu_tanh(x):
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh)."""
    return F.gelu(x, approximate="tanh")


def gelu_ggml_cpu(x):
    """GELU as llama.cpp's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16): an input in
    (-10, 10) is rounded to float16 and looked up in a table of float16-rounded float32 GELU(tanh)
    values; 0 at or below -10, x at or above 10. About 5e-4 relative error per activation."""
    table = gelu_tanh(x.to(torch.float16).to(torch.float32)).to(torch.float16).to(x.dtype)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


FFN_GELU = {"tanh": gelu_tanh, "ggml_cpu": gelu_ggml_cpu}


def geglu(x, w: Gemma3LayerWeights, gelu=gelu_tanh):
    """[n, n_embd] -> [n, n_embd]: (gelu(x W_gate) * x W_up) W_down."""
    return (gelu(x @ w.w_gate.T) * (x @ w.w_up.T)) @ w.w_down.T


def sliding_window_mask(q_pos, k_pos, sliding_window):
    """[n_q, n_k] bool, True where q - k < n_swa (llama.cpp's LLAMA_SWA_TYPE_STANDARD, is_masked_swa)."""
    return (q_pos[:, None] - k_pos[None, :]) < sliding_window


def layer_attention(q, k, v, q_pos, k_pos, rope, scale, sliding_window=0, group_size=1, window=None):
    """One layer's causal attention, [n_head, n_q, head_dim] (q, k, v before RoPE, as in attention.py).

    sliding_window > 0 also hides the keys with q - k >= sliding_window; group_size > 1 takes the
    scores of exact Self-Extend (attention.self_extend_scores), in the same single softmax.
    """
    if group_size > 1:
        scores = self_extend_scores(q, k, q_pos, k_pos, group_size, window, rope, scale)
    else:
        scores = rotated_scores(q, k, q_pos, k_pos, rope, scale)           # [n_head, n_q, n_k]
    visible = causal_mask(q_pos, k_pos)                                    # [n_q, n_k]
    if sliding_window:
        visible = visible & sliding_window_mask(q_pos, k_pos, sliding_window)
    return softmax_attend(scores, visible, v)


# ----------------------------------------------------------------------------- model

class Gemma3Model(ReferenceModel):
    """ReferenceModel's interface (forward, new_cache, decode, decode_in_batches, to) for Gemma 3.

    Extra keyword self_extend_sliding (forward, decode): apply Self-Extend to the sliding-window
    layers as well. The chunked mode (llama-completion's) is not implemented for Gemma 3.
    """

    def __init__(self, hparams: Gemma3HParams, tok_embd, layers, output_norm, output, rope, rope_swa,
                 dtype, ffn_gelu="tanh"):
        super().__init__(hparams, tok_embd, layers, output_norm, output, rope, dtype)
        if ffn_gelu not in FFN_GELU:
            raise ValueError(f"ffn_gelu must be one of {sorted(FFN_GELU)}, got {ffn_gelu!r}")
        self.rope_swa = rope_swa  # RoPE of the sliding-window layers (self.rope: the global ones)
        self.ffn_gelu = ffn_gelu

    @classmethod
    def from_gguf(cls, path, dtype=torch.float64, ffn_gelu="tanh"):
        """Load a gemma3 GGUF; every quant type the gguf package knows is dequantized.
        ffn_gelu="ggml_cpu" matches llama.cpp's CPU backend (see gelu_ggml_cpu)."""
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        reader = open_gguf(path)
        hp = read_gemma3_hparams(reader, path)
        arrays = read_tensors(reader, path)
        take = TensorTaker(arrays, path, dtype)

        q_dim, kv_dim, d = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.head_dim
        layers = [Gemma3LayerWeights(
            attn_norm=take(f"blk.{i}.attn_norm.weight", (hp.n_embd,)),
            wq=take(f"blk.{i}.attn_q.weight", (q_dim, hp.n_embd)),
            q_norm=take(f"blk.{i}.attn_q_norm.weight", (d,)),
            wk=take(f"blk.{i}.attn_k.weight", (kv_dim, hp.n_embd)),
            k_norm=take(f"blk.{i}.attn_k_norm.weight", (d,)),
            wv=take(f"blk.{i}.attn_v.weight", (kv_dim, hp.n_embd)),
            wo=take(f"blk.{i}.attn_output.weight", (hp.n_embd, q_dim)),
            post_attn_norm=take(f"blk.{i}.post_attention_norm.weight", (hp.n_embd,)),
            ffn_norm=take(f"blk.{i}.ffn_norm.weight", (hp.n_embd,)),
            w_gate=take(f"blk.{i}.ffn_gate.weight", (hp.n_ff, hp.n_embd)),
            w_up=take(f"blk.{i}.ffn_up.weight", (hp.n_ff, hp.n_embd)),
            w_down=take(f"blk.{i}.ffn_down.weight", (hp.n_embd, hp.n_ff)),
            post_ffn_norm=take(f"blk.{i}.post_ffw_norm.weight", (hp.n_embd,)),
        ) for i in range(hp.n_layer)]
        tok_embd = take("token_embd.weight", (hp.n_vocab, hp.n_embd))
        output_norm = take("output_norm.weight", (hp.n_embd,))
        output = take("output.weight", (hp.n_vocab, hp.n_embd)) if "output.weight" in arrays else tok_embd
        take.check_all_taken("the Gemma 3 reference")
        rope = Rope(n_dims=hp.rope_dims, base=hp.rope_base, freq_scale=hp.rope_freq_scale, neox=True)
        rope_swa = Rope(n_dims=hp.rope_dims, base=hp.rope_base_swa, neox=True)  # llama.cpp: freq_scale_swa 1
        return cls(hp, tok_embd, layers, output_norm, output, rope, rope_swa, dtype, ffn_gelu)

    def to(self, dtype):
        """A copy with the weights cast to dtype."""
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        tok_embd = self.tok_embd.to(dtype)
        output = tok_embd if self.tied_output else self.output.to(dtype)
        return Gemma3Model(self.hparams, tok_embd, [w.to(dtype) for w in self.layers],
                           self.output_norm.to(dtype), output, self.rope, self.rope_swa, dtype, self.ffn_gelu)

    # ------------------------------------------------------------------ pieces

    def block(self, w: Gemma3LayerWeights, x, attend):
        """One Gemma 3 block; attend(q, k, v) does the attention of this layer."""
        hp, n, eps = self.hparams, x.shape[0], self.hparams.rms_eps
        h = rms_norm(x, w.attn_norm, eps)                                          # [n, n_embd]
        q = (h @ w.wq.T).view(n, hp.n_head, hp.head_dim).transpose(0, 1)          # [n_head, n, d]
        k = (h @ w.wk.T).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)       # [n_head_kv, n, d]
        v = (h @ w.wv.T).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)       # [n_head_kv, n, d]
        q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)            # per head, before RoPE
        a = attend(q, k, v).transpose(0, 1).reshape(n, hp.n_head * hp.head_dim)  # [n, n_head * d]
        x = x + rms_norm(a @ w.wo.T, w.post_attn_norm, eps)
        ffn = geglu(rms_norm(x, w.ffn_norm, eps), w, FFN_GELU[self.ffn_gelu])
        return x + rms_norm(ffn, w.post_ffn_norm, eps)

    def embed(self, tokens):
        return super().embed(tokens) * math.sqrt(self.hparams.n_embd)          # [n, n_embd]

    def logits(self, x):
        logits = super().logits(x)                                             # [n, n_vocab]
        cap = self.hparams.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def layer_attend(self, layer, q_pos, k_pos, mode, self_extend_sliding=False):
        """attend(q, k, v) of one layer: its RoPE, its mask, and Self-Extend if it applies to it."""
        hp = self.hparams
        sliding = hp.swa_layers[layer]
        extend = mode.name == "self_extend" and (self_extend_sliding or not sliding)
        rope = self.rope_swa if sliding else self.rope
        n_swa = hp.sliding_window if sliding else 0
        group_size = mode.group_size if extend else 1

        def attend(q, k, v):
            return layer_attention(q, k, v, q_pos, k_pos, rope, hp.attention_scale, n_swa, group_size, mode.window)
        return attend

    @staticmethod
    def check_mode(mode):
        if mode.name == "chunked":
            raise ValueError("the chunked mode (llama-completion's) is not implemented for Gemma 3")
        return mode

    # ------------------------------------------------------------------ prefill and decode

    def forward(self, tokens, mode="vanilla", group_size=1, window=None,
                n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False, self_extend_sliding=False):
        """Logits [n, n_vocab] for tokens at positions 0..n-1: mode "vanilla" or "self_extend"
        (on the global layers; on every layer with self_extend_sliding=True)."""
        mode = self.check_mode(self.attention_mode(mode, group_size, window, n_batch, pos_div_sign_bug))
        x = self.embed(tokens)
        pos = torch.arange(x.shape[0])
        for i, w in enumerate(self.layers):
            x = self.block(w, x, self.layer_attend(i, pos, pos, mode, self_extend_sliding))
        return self.logits(x)

    __call__ = forward

    def decode(self, tokens, cache: KVCache, self_extend_sliding=False):
        """Append tokens to cache at positions cache.n_past.. and return their logits [n, n_vocab].
        The cache keeps every key of the sliding-window layers too; the mask hides the old ones."""
        mode = self.check_mode(cache.mode)
        x = self.embed(tokens)
        q_pos = cache.n_past + torch.arange(x.shape[0])                        # [n]
        k_pos = torch.cat((cache.cell_pos, q_pos))                             # [n_cells + n]
        for i, w in enumerate(self.layers):
            attend = self.layer_attend(i, q_pos, k_pos, mode, self_extend_sliding)
            x = self.block(w, x, lambda q, k, v, i=i, attend=attend: attend(q, *cache.append(i, k, v)))
        cache.cell_pos, cache.rope_pos = k_pos, k_pos
        cache.n_past += x.shape[0]
        return self.logits(x)
