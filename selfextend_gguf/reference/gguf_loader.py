"""Read a llama- or qwen2-architecture GGUF file with the `gguf` package: hyperparameters and
dequantized tensors.

Tensors come back in torch order (the reverse of ggml's ne): a weight of ggml shape
[n_in, n_out] is returned as [n_out, n_in], so that y = x @ W.T. The Q and K weights (and
biases) are kept exactly as stored, i.e. in the layout llama.cpp expects for the
architecture's RoPE (ROPE_NEOX below).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from ..gguf_info import field, rope_scaling

# the RoPE layout llama.cpp uses for each supported architecture (llama_model_rope_type):
# llama LLAMA_ROPE_TYPE_NORM (adjacent pairs), qwen2 LLAMA_ROPE_TYPE_NEOX (halves)
ROPE_NEOX = {"llama": False, "qwen2": True}
SUPPORTED_ARCHITECTURES = tuple(ROPE_NEOX)


class GGUFError(ValueError):
    """A GGUF file that the reference cannot load; the message names the file and the problem."""


@dataclass(frozen=True)
class LlamaHParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_dims: int
    rope_base: float
    rope_freq_scale: float    # 1 / linear scaling factor
    architecture: str = "llama"

    @property
    def rope_neox(self) -> bool:
        """True where llama.cpp rotates (x[i], x[i + n_rot/2]) pairs, False for (x[2i], x[2i+1])."""
        return ROPE_NEOX[self.architecture]


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


def read_llama_hparams(reader, path=""):
    """LlamaHParams from the {arch}.* metadata keys (llama, qwen2: the same keys and meaning);
    raises GGUFError for other architectures."""
    arch = architecture(reader)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; the reference decoder "
                        f"supports {', '.join(SUPPORTED_ARCHITECTURES)}")

    def required(key):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: missing metadata key {arch}.{key}")
        if isinstance(value, list):
            raise GGUFError(f"{path}: per-layer {arch}.{key} is not supported")
        return value

    def optional(key, default):
        value = field(reader, f"{arch}.{key}", default)
        if isinstance(value, list):
            raise GGUFError(f"{path}: per-layer {arch}.{key} is not supported")
        return value

    if optional("expert_count", 0):
        raise GGUFError(f"{path}: mixture-of-experts {arch} models are not supported")
    rope_freq_scale = supported_rope_freq_scale(reader, arch, path)

    n_embd, n_head = int(required("embedding_length")), int(required("attention.head_count"))
    head_dim = int(optional("attention.key_length", n_embd // n_head))
    if int(optional("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: key_length != value_length is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFError(f"{path}: missing tensor token_embd.weight")
    return LlamaHParams(
        n_vocab=int(optional("vocab_size", int(embd.shape[1]))),
        n_embd=n_embd,
        n_layer=int(required("block_count")),
        n_head=n_head,
        n_head_kv=int(optional("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(required("feed_forward_length")),
        n_ctx_train=int(required("context_length")),
        rms_eps=float(required("attention.layer_norm_rms_epsilon")),
        rope_dims=int(optional("rope.dimension_count", head_dim)),
        rope_base=float(optional("rope.freq_base", 10000.0)),
        rope_freq_scale=rope_freq_scale,
        architecture=arch,
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


def load_llama_gguf(path):
    """(LlamaHParams, {name: float32 ndarray}) for a llama- or qwen2-architecture GGUF file."""
    reader = open_gguf(path)
    hparams = read_llama_hparams(reader, path)
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
