"""Read a GGUF file of a supported architecture (ARCHITECTURES: llama, qwen2, qwen3, gemma2, gemma3, phi2, phi3)
with the `gguf` package: hyperparameters (HParams, with the architecture's ArchOptions) and dequantized tensors.

Tensors come back in torch order (the reverse of ggml's ne): a weight of ggml shape
[n_in, n_out] is returned as [n_out, n_in], so that y = x @ W.T. The Q and K weights (and
biases) are kept exactly as stored, i.e. in the layout llama.cpp expects for the
architecture's RoPE (ArchOptions.rope_neox).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from ..gguf_info import field, rope_scaling, sliding_window


class GGUFError(ValueError):
    """A GGUF file that the reference cannot load; the message names the file and the problem."""


def head_dim_attention_scale(n_layer, n_embd, n_head, head_dim):
    """1/sqrt(head_dim), the attention scale of most architectures."""
    return 1.0 / math.sqrt(head_dim)


def gemma_attention_scale(n_layer_27b):
    """gemma2.cpp, gemma3.cpp: the 27B model (46 layers in Gemma 2, 62 in Gemma 3) scales by
    1/sqrt(n_embd / n_head), the others by 1/sqrt(head_dim)."""
    def scale(n_layer, n_embd, n_head, head_dim):
        return 1.0 / math.sqrt(n_embd // n_head if n_layer == n_layer_27b else head_dim)
    return scale


@dataclass(frozen=True)
class ArchOptions:
    """What an architecture changes in the llama decoder (reference/model.py applies these), as
    llama.cpp's src/models/<arch>.cpp and llama_model::load_hparams have it."""
    rope_neox: bool = False           # llama_model_rope_type: NEOX (x[i], x[i + n_rot/2]), else NORM (x[2i], x[2i+1])
    qk_norm: bool = False             # per-head RMSNorm of Q and K before RoPE (attn_q_norm, attn_k_norm)
    post_norms: bool = False          # RMSNorm of the attention and FFN outputs (post_attention_norm, post_ffw_norm)
    ffn_act: str = "silu"             # the FFN's activation: "silu" (SwiGLU) or "gelu" (GELU(tanh), GeGLU)
    ffn_gated: bool = True            # False: act(x W_up + b_up) W_down + b_down, no gate (phi2)
    ffn_gate_up_fused: bool = False   # ffn_up holds the gate (its first n_ff rows) and then the up projection (phi3)
    layer_norm: bool = False          # LayerNorm with weight and bias (eps: attention.layer_norm_epsilon), not RMSNorm
    parallel_block: bool = False      # attention and FFN both read attn_norm(x): x + attn + ffn (phi2)
    embd_scale: bool = False          # token embeddings times sqrt(n_embd)
    swa_pattern: Optional[int] = None  # llama.cpp's default sliding_window_pattern; None: no sliding layers
    rope_base_swa: Optional[float] = 10000.0  # default rope.freq_base_swa (the sliding layers' RoPE base);
                                              # None: the global layers' rope.freq_base
    logit_softcapping: bool = False   # reads final_logit_softcapping
    attn_softcapping: bool = False    # reads attn_logit_softcapping (llama.cpp's default 50): scores = c tanh(s / c)
    # (n_layer, n_embd, n_head, head_dim) -> the scores' scale
    attention_scale: Callable[[int, int, int, int], float] = head_dim_attention_scale


# Adding an architecture: a row here (and the options it needs, in ArchOptions and model.py).
ARCHITECTURES = {
    "llama": ArchOptions(),
    "qwen2": ArchOptions(rope_neox=True),  # + Q/K/V biases, which any file may carry (model.py)
    "qwen3": ArchOptions(rope_neox=True, qk_norm=True),  # head_dim: attention.key_length, as any file may say
    "gemma2": ArchOptions(rope_neox=True, post_norms=True, ffn_act="gelu", embd_scale=True, swa_pattern=2,
                          rope_base_swa=None, logit_softcapping=True, attn_softcapping=True,
                          attention_scale=gemma_attention_scale(46)),
    "gemma3": ArchOptions(rope_neox=True, qk_norm=True, post_norms=True, ffn_act="gelu", embd_scale=True,
                          swa_pattern=6, logit_softcapping=True, attention_scale=gemma_attention_scale(62)),
    # + fused attn_qkv, biases on every projection and the output, partial rotary (rope.dimension_count)
    "phi2": ArchOptions(rope_neox=True, ffn_act="gelu", ffn_gated=False, layer_norm=True, parallel_block=True),
    # + fused attn_qkv, LongRoPE (rope_factors_long / rope_factors_short, see model.py), no sliding window:
    # llama.cpp turns Phi-3's off when it loads the model
    "phi3": ArchOptions(rope_neox=True, ffn_gate_up_fused=True),
}


@dataclass(frozen=True)
class HParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float                  # of RMSNorm (layer_norm_rms_epsilon), or of LayerNorm (layer_norm_epsilon)
    rope_dims: int
    rope_base: float
    rope_freq_scale: float           # 1 / linear scaling factor
    rope_attn_factor: float          # rope.scaling.attn_factor (1 if absent): scales every RoPE rotation
    n_ctx_orig: int                  # rope.scaling.original_context_length (n_ctx_train if absent): past it
                                     # llama.cpp picks LongRoPE's long factors (model.py)
    architecture: str                # general.architecture, a key of ARCHITECTURES
    options: ArchOptions             # ARCHITECTURES[architecture]
    attention_scale: float           # the scores' scale (llama.cpp's f_attention_scale)
    sliding_window: int              # n_swa; 0: no sliding-window layers
    swa_layers: Tuple[bool, ...]     # per layer, True for a sliding-window layer
    rope_base_swa: float             # RoPE base of the sliding-window layers
    final_logit_softcapping: float   # 0: none
    attn_logit_softcapping: float    # 0: none; else every attention score s becomes c tanh(s / c)

    @property
    def rope_neox(self) -> bool:
        """True where llama.cpp rotates (x[i], x[i + n_rot/2]) pairs, False for (x[2i], x[2i+1])."""
        return self.options.rope_neox


def open_gguf(path):
    """GGUFReader for path, after checking that the file is complete."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on a short or corrupt file
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{path}: truncated file: tensor {t.name!r} ends at byte {end}, "
                            f"file has {size} bytes")
    return reader


def supported_rope_freq_scale(reader, arch, path) -> float:
    """rope_freq_scale for the reference: no or linear RoPE scaling (GGUFError for others)."""
    try:
        return rope_scaling(reader, arch).linear_freq_scale(path)
    except ValueError as error:
        raise GGUFError(str(error)) from None


def architecture(reader):
    arch = field(reader, "general.architecture")
    if arch is None:
        raise GGUFError("GGUF file has no general.architecture key")
    return arch


def sliding_layers(n_layer, sliding_window, pattern, default_pattern):
    """Per layer, True for a sliding-window layer, as llama.cpp's load_swa_pattern decides.

    pattern: the {arch}.attention.sliding_window_pattern value: absent (None) -> default_pattern
    (the architecture's); an int n -> layer i slides iff i % n < n - 1 (every n-th layer is global;
    0: every layer slides); a list of bools -> as listed. Without a sliding window (0) no layer slides.
    """
    if not sliding_window:
        return (False,) * n_layer
    if isinstance(pattern, list):
        if len(pattern) < n_layer:
            raise GGUFError(f"sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return tuple(bool(p) for p in pattern[:n_layer])
    n = default_pattern if pattern is None else int(pattern)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


def read_hparams(reader, path=""):
    """HParams from the {arch}.* metadata keys, as llama.cpp reads them for the architectures of
    ARCHITECTURES; raises GGUFError for others."""
    arch = architecture(reader)
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; the reference decoder "
                        f"supports {', '.join(ARCHITECTURES)}")
    options = ARCHITECTURES[arch]

    def optional(key, default=None, per_layer=False):
        value = field(reader, f"{arch}.{key}", default)
        if isinstance(value, list) and not per_layer:
            raise GGUFError(f"{path}: per-layer {arch}.{key} is not supported")
        return value

    def required(key):
        value = optional(key)
        if value is None:
            raise GGUFError(f"{path}: missing metadata key {arch}.{key}")
        return value

    if optional("expert_count", 0):
        raise GGUFError(f"{path}: mixture-of-experts {arch} models are not supported")
    rope_freq_scale = supported_rope_freq_scale(reader, arch, path)

    n_embd, n_head = int(required("embedding_length")), int(required("attention.head_count"))
    n_layer = int(required("block_count"))
    head_dim = int(optional("attention.key_length", n_embd // n_head))
    if int(optional("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: key_length != value_length is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFError(f"{path}: missing tensor token_embd.weight")
    rope_base = float(optional("rope.freq_base", 10000.0))
    swa = options.swa_pattern is not None  # the architecture has sliding-window layers
    n_swa = sliding_window(reader, arch) if swa else 0
    pattern = optional("attention.sliding_window_pattern", per_layer=True) if swa else None
    rope_base_swa = rope_base if options.rope_base_swa is None else options.rope_base_swa
    return HParams(
        n_vocab=int(optional("vocab_size", int(embd.shape[1]))),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=int(optional("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(required("feed_forward_length")),
        n_ctx_train=int(required("context_length")),
        norm_eps=float(required("attention.layer_norm_epsilon" if options.layer_norm
                                else "attention.layer_norm_rms_epsilon")),
        rope_dims=int(optional("rope.dimension_count", head_dim)),
        rope_base=rope_base,
        rope_freq_scale=rope_freq_scale,
        rope_attn_factor=float(optional("rope.scaling.attn_factor", 1.0)),
        n_ctx_orig=int(optional("rope.scaling.original_context_length", required("context_length"))),
        architecture=arch,
        options=options,
        attention_scale=options.attention_scale(n_layer, n_embd, n_head, head_dim),
        sliding_window=n_swa,
        swa_layers=sliding_layers(n_layer, n_swa, pattern, options.swa_pattern),
        rope_base_swa=float(optional("rope.freq_base_swa", rope_base_swa)) if swa else rope_base,
        final_logit_softcapping=float(optional("final_logit_softcapping", 0.0) or 0.0)
        if options.logit_softcapping else 0.0,
        attn_logit_softcapping=float(optional("attn_logit_softcapping", 50.0) or 0.0)
        if options.attn_softcapping else 0.0,
    )


def read_tensors(reader, path=""):
    """{name: float32 ndarray in torch order}, every tensor dequantized with gguf.quants."""
    tensors = {}
    for t in reader.tensors:
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                            f"which the gguf package cannot dequantize") from e
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        tensors[t.name] = np.array(values, dtype=np.float32).reshape(shape)  # a copy, not the mmap
    return tensors


def load_gguf(path):
    """(HParams, {name: float32 ndarray}) for a GGUF file of a supported architecture."""
    reader = open_gguf(path)
    hparams = read_hparams(reader, path)
    return hparams, read_tensors(reader, path)


class TensorTaker:
    """Hands out a GGUF's tensors by name, checking their shape, and knows which were never taken."""

    def __init__(self, arrays, path, dtype):
        self.arrays, self.path, self.dtype = arrays, path, dtype
        self.taken = set()

    def __call__(self, name, shape):
        """The tensor name as a torch tensor of dtype; GGUFError if missing or of another shape."""
        if name not in self.arrays:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        if tuple(self.arrays[name].shape) != shape:
            raise GGUFError(f"{self.path}: tensor {name!r} has shape {tuple(self.arrays[name].shape)}, "
                            f"expected {shape}")
        self.taken.add(name)
        import torch  # the loader itself works without torch
        return torch.from_numpy(self.arrays[name]).to(self.dtype)

    def optional(self, name, shape):
        return self(name, shape) if name in self.arrays else None

    def check_all_taken(self, decoder):
        """GGUFError if the file holds tensors that no one took (a decoder that would ignore them)."""
        unknown = sorted(set(self.arrays) - self.taken)
        if unknown:
            raise GGUFError(f"{self.path}: tensors {decoder} does not implement: {unknown[:5]}")
