"""Independent PyTorch reference for Self-Extend on llama- and qwen2-architecture GGUF models.

    positions.py    grouped positions, neighbor mask, llama-completion's KV position shifts
    rope.py         RoPE as llama.cpp applies it (normal and NeoX layouts)
    attention.py    vanilla_attention, self_extend_attention, chunked_attention
    gguf_loader.py  hyperparameters and dequantized tensors via the gguf package
    model.py        ReferenceModel (prefill forward, incremental decode with KVCache)
    gemma3.py       Gemma3Model: Gemma 3 (sliding-window and global layers, Self-Extend on the
                    global ones); ReferenceModel.from_gguf returns one for a gemma3 file
"""
from .attention import (AttentionMode, chunked_attention, self_extend_attention,
                        vanilla_attention)
from .gguf_loader import GGUFError, LlamaHParams, load_llama_gguf
from .model import KVCache, ReferenceModel
from .gemma3 import Gemma3Model
from .positions import (chunked_positions, chunked_rope_positions, completion_kv_shift, grouped_key_position,
                        grouped_query_position, neighbor_mask, self_extend_relative_positions)
from .rope import Rope

__all__ = [
    "AttentionMode", "GGUFError", "Gemma3Model", "KVCache", "LlamaHParams", "ReferenceModel", "Rope",
    "chunked_attention", "chunked_positions", "chunked_rope_positions", "completion_kv_shift", "grouped_key_position",
    "grouped_query_position", "load_llama_gguf", "neighbor_mask", "self_extend_attention",
    "self_extend_relative_positions", "vanilla_attention",
]
