"""The reference decoder for every supported GGUF architecture (gguf_loader.ARCHITECTURES), in
plain torch: one decoder, with the per-architecture options of HParams.options (ArchOptions).

    x = token_embd[tokens]                                   (* sqrt(n_embd) if embd_scale)
    n_layer x [ x += post_attn_norm(attn(attn_norm(x)))      (post_*_norm: only with post_norms)
                x += post_ffn_norm(ffn(ffn_norm(x))) ]       ffn: (act(x W_gate) * x W_up) W_down
    logits = output_norm(x) @ output.T                       (output: token_embd if tied; softcapped
                                                              if the file says so)

as llama.cpp computes it (src/models/<arch>.cpp); every norm is RMSNorm (phi2: LayerNorm), weights used
as stored.
    llama   SwiGLU (act = silu), normal RoPE; Q/K/V biases (attn_{q,k,v}.bias) loaded if present
    qwen2   llama with NeoX RoPE (and the Q/K/V biases, added before RoPE)
    qwen3   llama with NeoX RoPE and per-head RMSNorm of Q and K (attn_q_norm, attn_k_norm; the model's
            rms eps, as gemma3's) before RoPE; head_dim from attention.key_length (Qwen3: not n_embd / n_head)
    gemma2  gemma3 without the q/k norms, with attention logit soft-capping (every score s becomes
            c tanh(s / c), c = attn_logit_softcapping, grouped and neighbor scores alike), every 2nd layer
            global (n_swa 4096 by default), one RoPE base for both kinds of layers; 27B: 46 layers
    phi2    LayerNorm (weight and bias) instead of RMSNorm; attention and an ungated GELU FFN in parallel,
            both on attn_norm(x): x + attn + ffn; biases on every projection and the logits; fused
            attn_qkv; NeoX RoPE on the first rope.dimension_count dimensions of each head only
    phi3    llama with NeoX RoPE (on rope.dimension_count dimensions), a fused attn_qkv, and ffn_up holding
            the gate and the up projection; LongRoPE: two sets of RoPE factors, rope_factors_short and
            rope_factors_long, picked as llama.cpp picks them (global_rope: long where the context, or with
            Self-Extend on the span it rotates, exceeds rope.scaling.original_context_length), and every
            rotation scaled by rope.scaling.attn_factor (Rope.attn_factor)
    gemma3  NeoX RoPE; per-head RMSNorm of Q and K (attn_q_norm, attn_k_norm) before RoPE; post-norms;
            GELU(tanh)-gated FFN; embeddings * sqrt(n_embd); scores scaled by 1/sqrt(head_dim)
            (27B: 1/sqrt(n_embd / n_head)); final logit softcapping; the HF -> GGUF converter already
            wrote Gemma's (1 + w) into the norm weights. Two kinds of layers (llama.cpp's iSWA cache):
                sliding-window layer: key visible iff 0 <= q - k < n_swa   RoPE base rope.freq_base_swa
                global layer:         key visible iff 0 <= q - k           RoPE base rope.freq_base (and scaling)

mode="self_extend" applies Self-Extend to the global layers only (of gemma2 and gemma3) and leaves the sliding-window layers
at their normal positions, as the patched llama.cpp does. That is exact when W >= n_swa: a
sliding-window layer sees only keys with q - k < n_swa <= W, which Self-Extend keeps at their normal
positions anyway. self_extend_sliding=True (forward, decode) applies it to every layer instead, to
check that claim. The chunked mode (llama-completion's) is refused for models with sliding layers.
ffn_gelu="ggml_cpu" (from_gguf) reproduces llama.cpp's CPU GELU (see gelu_ggml_cpu), "tanh"
(default) is the exact formula, as transformers computes it.

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
import math
from dataclasses import dataclass, fields
from typing import List, Optional

import torch
import torch.nn.functional as F

from .attention import LLAMA_CPP_DEFAULT_N_BATCH, AttentionMode, chunked_attention, layer_attention
from .gguf_loader import HParams, TensorTaker, load_gguf
from .positions import completion_kv_shift, grouped_query_position
from .rope import Rope


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [n_embd]
    wq: torch.Tensor         # [n_head * head_dim, n_embd]
    wk: torch.Tensor         # [n_head_kv * head_dim, n_embd]
    wv: torch.Tensor         # [n_head_kv * head_dim, n_embd]
    wo: torch.Tensor         # [n_embd, n_head * head_dim]
    ffn_norm: Optional[torch.Tensor]  # [n_embd]  (None: the FFN reads attn_norm(x), parallel_block)
    w_gate: Optional[torch.Tensor]    # [n_ff, n_embd]  (None: an ungated FFN, ffn_gated=False)
    w_up: torch.Tensor       # [n_ff, n_embd]
    w_down: torch.Tensor     # [n_embd, n_ff]
    bq: Optional[torch.Tensor] = None              # [n_head * head_dim]     (qwen2; None: no bias)
    bk: Optional[torch.Tensor] = None              # [n_head_kv * head_dim]
    bv: Optional[torch.Tensor] = None              # [n_head_kv * head_dim]
    q_norm: Optional[torch.Tensor] = None          # [head_dim]  (qk_norm; None: no norm)
    k_norm: Optional[torch.Tensor] = None          # [head_dim]
    post_attn_norm: Optional[torch.Tensor] = None  # [n_embd]    (post_norms; None: no norm)
    post_ffn_norm: Optional[torch.Tensor] = None   # [n_embd]
    attn_norm_b: Optional[torch.Tensor] = None     # [n_embd]    (layer_norm: LayerNorm's bias)
    bo: Optional[torch.Tensor] = None              # [n_embd]    (phi2: biases of the output projection
    b_up: Optional[torch.Tensor] = None            # [n_ff]       and of the FFN)
    b_down: Optional[torch.Tensor] = None          # [n_embd]

    def to(self, dtype):
        """A copy with every tensor cast to dtype (absent ones stay None)."""
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
    """[..., n_embd] -> [..., n_embd]: x / sqrt(mean(x^2) + eps) * weight; x itself if weight is None."""
    return x if weight is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    """[..., n_embd] -> [..., n_embd]: (x - mean) / sqrt(var + eps) * weight + bias (ggml_norm, then
    the weight and bias)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def linear(x, weight, bias=None):
    """[n, n_in] -> [n, n_out]: x @ weight.T, plus bias [n_out] if given."""
    y = x @ weight.T
    return y if bias is None else y + bias


def gelu_tanh(x):
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh)."""
    return F.gelu(x, approximate="tanh")


def gelu_ggml_cpu(x):
    """GELU as llama.cpp's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16): an input in
    (-10, 10) is rounded to float16 and looked up in a table of float16-rounded float32 GELU(tanh)
    values; 0 at or below -10, x at or above 10. About 5e-4 relative error per activation."""
    table = gelu_tanh(x.to(torch.float16).to(torch.float32)).to(torch.float16).to(x.dtype)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


FFN_GELU = {"tanh": gelu_tanh, "ggml_cpu": gelu_ggml_cpu}  # ffn_gelu -> the "gelu" FFN gate


def ffn(x, w: LayerWeights, act):
    """[n, n_embd] -> [n, n_embd]: (act(x W_gate) * x W_up) W_down (SwiGLU with silu, GeGLU with GELU),
    or act(x W_up + b_up) W_down + b_down where there is no gate (phi2)."""
    if w.w_gate is None:
        return linear(act(linear(x, w.w_up, w.b_up)), w.w_down, w.b_down)
    return (act(x @ w.w_gate.T) * (x @ w.w_up.T)) @ w.w_down.T


def check_dtype(dtype):
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


class ReferenceModel:
    def __init__(self, hparams: HParams, tok_embd, layers, output_norm, output, rope, rope_swa, dtype,
                 ffn_gelu="tanh", output_norm_b=None, output_b=None, rope_long=None, n_ctx=None):
        if ffn_gelu not in FFN_GELU:
            raise ValueError(f"ffn_gelu must be one of {sorted(FFN_GELU)}, got {ffn_gelu!r}")
        self.hparams = hparams
        self.tok_embd = tok_embd        # [n_vocab, n_embd]
        self.layers = layers            # n_layer x LayerWeights
        self.output_norm = output_norm  # [n_embd]
        self.output = output            # [n_vocab, n_embd], the token embedding if tied
        self.output_norm_b = output_norm_b  # [n_embd] LayerNorm's bias (layer_norm), or None
        self.output_b = output_b        # [n_vocab] the logits' bias (phi2), or None
        self.rope = rope                # RoPE of the global layers (every layer without sliding ones)
        self.rope_swa = rope_swa        # RoPE of the sliding-window layers
        self.rope_long = rope_long      # LongRoPE (phi3): the global layers' RoPE with the long factors, or None
        self.n_ctx = hparams.n_ctx_train if n_ctx is None else n_ctx  # llama.cpp's context size (per sequence),
                                                                      # which picks LongRoPE's factors
        self.dtype = dtype
        self.ffn_gelu = ffn_gelu        # "tanh" or "ggml_cpu": the GELU of an ffn_act "gelu" architecture
        self.ffn_act = F.silu if hparams.options.ffn_act == "silu" else FFN_GELU[ffn_gelu]

    @classmethod
    def from_gguf(cls, path, dtype=torch.float64, ffn_gelu="tanh", n_ctx=None):
        """Load a GGUF of any supported architecture; every quant type the gguf package knows is
        dequantized. ffn_gelu="ggml_cpu" matches llama.cpp's CPU backend (see gelu_ggml_cpu). n_ctx: the
        context size llama.cpp runs the model with (llama_n_ctx_seq; None: the trained context), which
        only LongRoPE models read (global_rope)."""
        check_dtype(dtype)
        hp, arrays = load_gguf(path)
        o = hp.options
        take = TensorTaker(arrays, path, dtype)

        def take_if(present, name, shape):  # required where the architecture has it
            return take(name, shape) if present else None

        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim

        def qkv(i):
            """(wq, wk, wv, bq, bk, bv) of layer i: separate, or split from a fused attn_qkv (phi2)."""
            fused = take.optional(f"blk.{i}.attn_qkv.weight", (q_dim + 2 * kv_dim, hp.n_embd))
            if fused is None:
                return (take(f"blk.{i}.attn_q.weight", (q_dim, hp.n_embd)),
                        take(f"blk.{i}.attn_k.weight", (kv_dim, hp.n_embd)),
                        take(f"blk.{i}.attn_v.weight", (kv_dim, hp.n_embd)),
                        take.optional(f"blk.{i}.attn_q.bias", (q_dim,)),
                        take.optional(f"blk.{i}.attn_k.bias", (kv_dim,)),
                        take.optional(f"blk.{i}.attn_v.bias", (kv_dim,)))
            bias = take.optional(f"blk.{i}.attn_qkv.bias", (q_dim + 2 * kv_dim,))
            split = (q_dim, kv_dim, kv_dim)
            return (*fused.split(split), *(bias.split(split) if bias is not None else (None,) * 3))

        def gate_up(i):
            """(w_gate, w_up) of layer i: separate, or split from ffn_up (phi3: the gate first, as ggml_swiglu
            reads the fused output)."""
            if o.ffn_gate_up_fused:
                return take(f"blk.{i}.ffn_up.weight", (2 * hp.n_ff, hp.n_embd)).split(hp.n_ff)
            return (take_if(o.ffn_gated, f"blk.{i}.ffn_gate.weight", (hp.n_ff, hp.n_embd)),
                    take(f"blk.{i}.ffn_up.weight", (hp.n_ff, hp.n_embd)))

        def layer(i):
            wq, wk, wv, bq, bk, bv = qkv(i)
            w_gate, w_up = gate_up(i)
            return LayerWeights(
                attn_norm=take(f"blk.{i}.attn_norm.weight", (hp.n_embd,)),
                wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv,
                wo=take(f"blk.{i}.attn_output.weight", (hp.n_embd, q_dim)),
                ffn_norm=take_if(not o.parallel_block, f"blk.{i}.ffn_norm.weight", (hp.n_embd,)),
                w_gate=w_gate,
                w_up=w_up,
                w_down=take(f"blk.{i}.ffn_down.weight", (hp.n_embd, hp.n_ff)),
                q_norm=take_if(o.qk_norm, f"blk.{i}.attn_q_norm.weight", (hp.head_dim,)),
                k_norm=take_if(o.qk_norm, f"blk.{i}.attn_k_norm.weight", (hp.head_dim,)),
                post_attn_norm=take_if(o.post_norms, f"blk.{i}.post_attention_norm.weight", (hp.n_embd,)),
                post_ffn_norm=take_if(o.post_norms, f"blk.{i}.post_ffw_norm.weight", (hp.n_embd,)),
                attn_norm_b=take_if(o.layer_norm, f"blk.{i}.attn_norm.bias", (hp.n_embd,)),
                bo=take.optional(f"blk.{i}.attn_output.bias", (hp.n_embd,)),
                b_up=take.optional(f"blk.{i}.ffn_up.bias", (hp.n_ff,)),
                b_down=take.optional(f"blk.{i}.ffn_down.bias", (hp.n_embd,)),
            )

        layers = [layer(i) for i in range(hp.n_layer)]
        tok_embd = take("token_embd.weight", (hp.n_vocab, hp.n_embd))
        output_norm = take("output_norm.weight", (hp.n_embd,))
        output_norm_b = take_if(o.layer_norm, "output_norm.bias", (hp.n_embd,))
        output = take.optional("output.weight", (hp.n_vocab, hp.n_embd))
        output_b = take.optional("output.bias", (hp.n_vocab,))
        freq_factors = take.optional("rope_freqs.weight", (hp.rope_dims // 2,))
        factors_short = take.optional("rope_factors_short.weight", (hp.rope_dims // 2,))  # LongRoPE (phi3)
        factors_long = take.optional("rope_factors_long.weight", (hp.rope_dims // 2,))
        take.check_all_taken(f"the reference decoder ({hp.architecture})")

        def global_layers_rope(factors):
            return Rope(n_dims=hp.rope_dims, base=hp.rope_base, freq_scale=hp.rope_freq_scale, neox=hp.rope_neox,
                        freq_factors=None if factors is None else factors.to(torch.float64),
                        attn_factor=hp.rope_attn_factor)

        # as llama_model::get_rope_factors: rope_freqs where the file has it, else LongRoPE's pair (if any)
        long_rope = freq_factors is None and (factors_short is not None or factors_long is not None)
        rope = global_layers_rope(freq_factors if freq_factors is not None else factors_short)
        rope_long = global_layers_rope(factors_long) if long_rope else None
        rope_swa = Rope(n_dims=hp.rope_dims, base=hp.rope_base_swa, neox=hp.rope_neox,  # llama.cpp: freq_scale_swa 1
                        attn_factor=hp.rope_attn_factor)
        return cls(hp, tok_embd, layers, output_norm, tok_embd if output is None else output, rope, rope_swa,
                   dtype, ffn_gelu, output_norm_b, output_b, rope_long, n_ctx)

    def to(self, dtype):
        """A copy with the weights cast to dtype (float32 <-> float64 is exact for GGUF weights)."""
        check_dtype(dtype)
        tok_embd = self.tok_embd.to(dtype)
        output = tok_embd if self.tied_output else self.output.to(dtype)
        def cast(t):
            return None if t is None else t.to(dtype)
        return ReferenceModel(self.hparams, tok_embd, [w.to(dtype) for w in self.layers],
                              self.output_norm.to(dtype), output, self.rope, self.rope_swa, dtype, self.ffn_gelu,
                              cast(self.output_norm_b), cast(self.output_b), self.rope_long, self.n_ctx)

    @property
    def tied_output(self):
        return self.output is self.tok_embd

    # ------------------------------------------------------------------ pieces

    def norm(self, x, weight, bias=None):
        """The architecture's norm: LayerNorm (with its bias) or RMSNorm; x itself if weight is None."""
        if self.hparams.options.layer_norm and weight is not None:
            return layer_norm(x, weight, bias, self.hparams.norm_eps)
        return rms_norm(x, weight, self.hparams.norm_eps)

    def block(self, w: LayerWeights, x, attend):
        """One transformer block; attend(q, k, v) does the attention of this layer."""
        hp, n, eps = self.hparams, x.shape[0], self.hparams.norm_eps
        h = self.norm(x, w.attn_norm, w.attn_norm_b)                                   # [n, n_embd]
        q = linear(h, w.wq, w.bq).view(n, hp.n_head, hp.head_dim).transpose(0, 1)      # [n_head, n, d]
        k = linear(h, w.wk, w.bk).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)   # [n_head_kv, n, d]
        v = linear(h, w.wv, w.bv).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)   # [n_head_kv, n, d]
        q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)                 # per head, before RoPE
        a = attend(q, k, v).transpose(0, 1).reshape(n, hp.n_head * hp.head_dim)       # [n, n_head * d]
        a = linear(a, w.wo, w.bo)                                                      # [n, n_embd]
        if hp.options.parallel_block:  # phi2: the FFN reads the same normed input as the attention
            return x + a + ffn(h, w, self.ffn_act)
        x = x + rms_norm(a, w.post_attn_norm, eps)
        f = ffn(self.norm(x, w.ffn_norm), w, self.ffn_act)                             # [n, n_embd]
        return x + rms_norm(f, w.post_ffn_norm, eps)

    def embed(self, tokens):
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if tokens.numel() == 0:
            raise ValueError("tokens must not be empty")
        if tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.hparams.n_vocab})")
        x = self.tok_embd[tokens]                                                      # [n, n_embd]
        return x * math.sqrt(self.hparams.n_embd) if self.hparams.options.embd_scale else x

    def logits(self, x):
        logits = linear(self.norm(x, self.output_norm, self.output_norm_b), self.output, self.output_b)  # [n, n_vocab]
        cap = self.hparams.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def attention_mode(self, mode="vanilla", group_size=1, window=None,
                       n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False):
        """The AttentionMode (mode itself if it is one), checked against this model."""
        if not isinstance(mode, AttentionMode):
            mode = AttentionMode(mode, group_size, window, n_batch, pos_div_sign_bug)
        return self.check_mode(mode)

    def check_mode(self, mode):
        if mode.name == "chunked" and any(self.hparams.swa_layers):
            raise ValueError(f"the chunked mode (llama-completion's) is not implemented for models with "
                             f"sliding-window layers ({self.hparams.architecture})")
        return mode

    def global_rope(self, mode):
        """The RoPE of the global layers under mode, with the factors llama_model::get_rope_factors picks. A
        LongRoPE model (phi3) takes its long factors where the context holds query-key distances past the
        original context: n_ctx > n_ctx_orig in llama.cpp. With Self-Extend on (G > 1) the patch reads the
        span Self-Extend rotates instead, the grouped position of the last query plus 1 (the first key's is
        0; closer pairs keep distances below W), so positions kept within the original context get the short
        factors."""
        if self.rope_long is None:
            return self.rope
        n_ctx_rotated = self.n_ctx
        if mode.name == "self_extend" and mode.group_size > 1 and self.n_ctx > mode.window:
            n_ctx_rotated = grouped_query_position(self.n_ctx - 1, mode.group_size, mode.window) + 1
        return self.rope_long if n_ctx_rotated > self.hparams.n_ctx_orig else self.rope

    def layer_attend(self, layer, mode, q_pos, k_pos, k_rope_pos=None, self_extend_sliding=False):
        """attend(q, k, v) of one layer: its RoPE, its mask, and Self-Extend if it applies to it."""
        hp = self.hparams
        sliding = hp.swa_layers[layer]
        extend = mode.name == "self_extend" and (self_extend_sliding or not sliding)
        rope = self.rope_swa if sliding else self.global_rope(mode)
        n_swa = hp.sliding_window if sliding else 0
        group_size = mode.group_size if extend else 1

        def attend(q, k, v):
            return layer_attention(q, k, v, q_pos, k_pos, rope, hp.attention_scale, n_swa, group_size,
                                   mode.window, k_rope_pos, hp.attn_logit_softcapping)
        return attend

    # ------------------------------------------------------------------ prefill

    def forward(self, tokens, mode="vanilla", group_size=1, window=None,
                n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False, self_extend_sliding=False):
        """Logits [n, n_vocab] for every position of tokens (positions 0..n-1), without a cache.

        mode: "vanilla", "self_extend" (exact, needs group_size and window; on the global layers, on
        every layer with self_extend_sliding=True) or "chunked" (llama-completion's
        --grp-attn-n/--grp-attn-w with -b n_batch; pos_div_sign_bug=True reproduces the pinned
        llama.cpp's K-shift sign error; not for models with sliding layers), or an AttentionMode.
        """
        mode = self.attention_mode(mode, group_size, window, n_batch, pos_div_sign_bug)
        x = self.embed(tokens)
        pos = torch.arange(x.shape[0])

        def chunked(q, k, v):  # every layer global: checked by attention_mode
            return chunked_attention(q, k, v, mode.group_size, mode.window, self.global_rope(mode),
                                     self.hparams.attention_scale,
                                     n_batch=mode.n_batch, pos_div_sign_bug=mode.pos_div_sign_bug,
                                     softcap=self.hparams.attn_logit_softcapping)

        for i, w in enumerate(self.layers):
            attend = chunked if mode.name == "chunked" else self.layer_attend(
                i, mode, pos, pos, self_extend_sliding=self_extend_sliding)
            x = self.block(w, x, attend)
        return self.logits(x)

    __call__ = forward

    # ------------------------------------------------------------------ incremental decode

    def new_cache(self, mode="vanilla", group_size=1, window=None,
                  n_batch=LLAMA_CPP_DEFAULT_N_BATCH, pos_div_sign_bug=False):
        """An empty KVCache; decode() takes the attention mode from it."""
        mode = self.attention_mode(mode, group_size, window, n_batch, pos_div_sign_bug)
        return KVCache(self.hparams.n_layer, mode)

    def decode(self, tokens, cache: KVCache, self_extend_sliding=False):
        """Append tokens to cache at positions cache.n_past.. and return their logits [n, n_vocab].

        In chunked mode one call is one llama-completion batch (mode.n_batch is not used here:
        decode_in_batches splits): the cache positions are first compressed exactly as
        llama-completion does before it calls llama_decode. The cache keeps every key of the
        sliding-window layers too; their mask hides the old ones.
        """
        mode = self.check_mode(cache.mode)
        x = self.embed(tokens)
        if mode.name == "chunked":
            cache.cell_pos, cache.rope_pos, cache.n_past, cache.ga_i = completion_kv_shift(
                cache.cell_pos, cache.rope_pos, cache.n_past, cache.ga_i, mode.group_size,
                mode.window, mode.pos_div_sign_bug)
        q_pos = cache.n_past + torch.arange(x.shape[0])                                # [n]
        k_pos = torch.cat((cache.cell_pos, q_pos))                                     # [n_cells + n]
        k_rope_pos = torch.cat((cache.rope_pos, q_pos))                                # [n_cells + n]

        for i, w in enumerate(self.layers):
            attend = self.layer_attend(i, mode, q_pos, k_pos, k_rope_pos, self_extend_sliding)
            x = self.block(w, x, lambda q, k, v, i=i, attend=attend: attend(q, *cache.append(i, k, v)))

        cache.cell_pos, cache.rope_pos = k_pos, k_rope_pos
        cache.n_past += x.shape[0]
        return self.logits(x)

    def decode_in_batches(self, tokens, cache: KVCache, n_batch, self_extend_sliding=False):
        """decode() the tokens n_batch at a time (as llama.cpp callers do); logits [n, n_vocab]."""
        return torch.cat([self.decode(tokens[i:i + n_batch], cache, self_extend_sliding)
                          for i in range(0, len(tokens), n_batch)])
