"""What selfextend_gguf needs to know about a GGUF file before llama.cpp loads it, and the metadata
readers that the torch reference's loader (reference/gguf_loader.py) uses too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"

# llama.cpp architectures whose attention has no RoPE (ALiBi, relative buckets, or no attention)
NO_ROPE_ARCHITECTURES = {"bloom", "mpt", "jais", "t5", "t5encoder", "mamba", "mamba2", "rwkv6", "rwkv7",
                         "rwkv6qwen2", "arwkv7", "bert", "nomic-bert", "jina-bert-v2", "gpt2"}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    n_ctx_train: int
    rope_freq_base: float | None
    rope_scaling_type: str | None   # "linear", "yarn", ... as the GGUF says, None if absent
    rope_dimension_count: int | None
    file_type: int | None
    size_bytes: int
    sliding_window: int | None = None   # n_swa of the sliding-window layers (Gemma 3), None if none

    @property
    def has_rope(self) -> bool:
        return self.architecture not in NO_ROPE_ARCHITECTURES


def field(reader, key, default=None):
    """The metadata value of key in a gguf.GGUFReader (a scalar, string or list), default if absent."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


@dataclass(frozen=True)
class RopeScaling:
    type: str | None   # "linear", "yarn", ... as the GGUF says; None if absent
    factor: float      # rope.scaling.factor, 0 if absent

    def linear_freq_scale(self, path) -> float:
        """llama.cpp's rope_freq_scale for no or linear scaling (1 / factor); ValueError for others."""
        if self.type not in (None, "none", "linear") or (self.type in (None, "none") and self.factor not in (0.0, 1.0)):
            raise ValueError(f"{path}: RoPE scaling {self.type!r} is not supported (only none or linear)")
        return 1.0 / self.factor if self.type == "linear" and self.factor > 0 else 1.0


def rope_scaling(reader, architecture: str) -> RopeScaling:
    return RopeScaling(field(reader, f"{architecture}.rope.scaling.type"),
                       float(field(reader, f"{architecture}.rope.scaling.factor", 0.0) or 0.0))


def read_model_info(path) -> ModelInfo:
    """Read the metadata of a GGUF file. Raises FileNotFoundError or ValueError with what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF'); "
                             "convert the model with llama.cpp's convert_hf_to_gguf.py")
    import gguf  # imported here: numpy-heavy

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # truncated or corrupt files raise various errors inside gguf
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {error}") from error
    architecture = field(reader, "general.architecture")
    if architecture is None:
        raise ValueError(f"{path} has no general.architecture key: not a model GGUF")
    n_ctx_train = field(reader, f"{architecture}.context_length")
    if n_ctx_train is None:
        raise ValueError(f"{path} has no {architecture}.context_length key")
    return ModelInfo(
        path=path,
        architecture=architecture,
        n_ctx_train=int(n_ctx_train),
        rope_freq_base=field(reader, f"{architecture}.rope.freq_base"),
        rope_scaling_type=rope_scaling(reader, architecture).type,
        rope_dimension_count=field(reader, f"{architecture}.rope.dimension_count"),
        file_type=field(reader, "general.file_type"),
        size_bytes=path.stat().st_size,
        sliding_window=field(reader, f"{architecture}.attention.sliding_window") or None,
    )
