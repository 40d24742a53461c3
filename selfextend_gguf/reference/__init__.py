"""Independent PyTorch reference for Self-Extend on llama-, qwen2-, qwen3- and gemma3-architecture GGUF models.

    positions.py    grouped positions, neighbor mask, llama-completion's KV position shifts
    rope.py         RoPE as llama.cpp applies it (normal and NeoX layouts)
    attention.py    vanilla_attention, self_extend_attention, chunked_attention; layer_attention
                    (a decoder layer's, optionally within a sliding window)
    gguf_loader.py  HParams (with the architecture's ArchOptions, from the ARCHITECTURES table) and
                    dequantized tensors via the gguf package
    model.py        ReferenceModel, the one decoder for every architecture (prefill forward,
                    incremental decode with KVCache; Self-Extend on the global layers of Gemma 3)
"""
from .attention import (AttentionMode, chunked_attention, layer_attention, self_extend_attention,
                        vanilla_attention)
from .gguf_loader import ARCHITECTURES, ArchOptions, GGUFError, HParams, load_gguf
from .model import KVCache, ReferenceModel
from .positions import (chunked_positions, chunked_rope_positions, completion_kv_shift, grouped_key_position,
                        grouped_query_position, neighbor_mask, self_extend_relative_positions)
from .rope import Rope

__all__ = [
    "ARCHITECTURES", "ArchOptions", "AttentionMode", "GGUFError", "HParams", "KVCache", "ReferenceModel", "Rope",
    "chunked_attention", "chunked_positions", "chunked_rope_positions", "completion_kv_shift", "grouped_key_position",
    "grouped_query_position", "layer_attention", "load_gguf", "neighbor_mask", "self_extend_attention",
    "self_extend_relative_positions", "vanilla_attention",
]
