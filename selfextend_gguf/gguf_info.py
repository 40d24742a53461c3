"""What selfextend_gguf needs to know about a GGUF file before llama.cpp loads it, and the metadata
readers that the torch reference's loader (reference/gguf_loader.py) uses too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"

# Architectures that Self-Extend refuses, by the reason (llama.cpp's names, general.architecture).
# Self-Extend regroups the positions that RoPE rotates the cached keys to, so it needs a causal
# decoder whose every attention layer caches RoPE-rotated keys (docs/backends.md has the table).
# The patched llama_set_self_extend refuses the same models by their properties (rope type, MLA,
# memory type, causality), for the native tools.
REFUSED_ARCHITECTURES = {
    "has no RoPE (ALiBi, relative position buckets or learned positions)":
        {"bloom", "mpt", "jais", "t5", "gpt2", "starcoder", "refact", "gptneox-alibi"},
    "has a recurrent or hybrid memory, whose state has no positions to regroup":
        {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba", "falcon-h1", "plamo2",
         "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe", "qwen3next", "kimi-linear",
         "bailingmoe3", "kimi-k3", "glm5-next", "qwen35", "qwen35moe", "qwen4exp", "deepseek4", "minimax-01"},
    "uses multi-head latent attention (MLA): its cache holds K compressed before RoPE, with a separate "
    "rotated part that llama.cpp does not regroup":
        {"deepseek2", "deepseek32", "minicpm3", "plm", "dots3note", "glm-dsa", "hy_v4"},
    "is not a causal decoder (an encoder or a diffusion model): there is no 'past' to group":
        {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "neo-bert", "modern-bert",
         "t5encoder", "dream", "llada", "llada-moe", "rnd1"},
}


def self_extend_refusal(architecture: str) -> str | None:
    """Why Self-Extend cannot run on this architecture, or None."""
    return next((reason for reason, names in REFUSED_ARCHITECTURES.items() if architecture in names), None)


# llama.cpp's n_swa where a GGUF has no {arch}.attention.sliding_window key (llama_model_gemma2)
DEFAULT_SLIDING_WINDOW = {"gemma2": 4096}
# The architectures whose llama.cpp loader reads attention.sliding_window and keeps it (src/models/*.cpp;
# phi3 reads it and then turns sliding windows off). Every other one runs full attention whatever the
# key says: a Mistral-style llama GGUF that carries sliding_window 4096 attends to every cached token
# in llama.cpp, and Self-Extend with it is exact.
SLIDING_WINDOW_ARCHITECTURES = {
    "afmoe", "cohere2", "cohere2moe", "deepseek4", "dflash", "dots3note", "exaone-moe", "exaone4",
    "gemma-embedding", "gemma2", "gemma3", "gemma3n", "gemma4-assistant", "gemma4", "granite_swa", "laguna",
    "lfm2", "llama4", "maple", "mellum", "mimo2", "modern-bert", "muse-glimmer", "olmo2", "gpt-oss",
    "plamo3", "smallthinker", "spark2_5", "step35"}


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
    sliding_window: int | None = None   # n_swa of the sliding-window layers (Gemma 2, 3), None if none

    @property
    def self_extend_refusal(self) -> str | None:
        """Why Self-Extend cannot run on this model's architecture, or None."""
        return self_extend_refusal(self.architecture)


def field(reader, key, default=None):
    """The metadata value of key in a gguf.GGUFReader (a scalar, string or list), default if absent."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def sliding_window(reader, architecture: str) -> int:
    """n_swa as llama.cpp reads it: the GGUF's key, else the architecture's default; 0: none, or an
    architecture that llama.cpp runs without sliding-window layers."""
    if architecture not in SLIDING_WINDOW_ARCHITECTURES:
        return 0
    return int(field(reader, f"{architecture}.attention.sliding_window",
                     DEFAULT_SLIDING_WINDOW.get(architecture, 0)) or 0)


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
        sliding_window=sliding_window(reader, architecture) or None,
    )
