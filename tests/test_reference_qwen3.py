"""The qwen3 architecture in the reference (gguf_loader.ARCHITECTURES["qwen3"]): the tiny fixture
(write_tiny_qwen3) and that the Self-Extend parity tests on it (test_parity_architectures.py) would notice a reference without
qwen3's pieces (q/k norms, NeoX RoPE). transformers' Qwen3ForCausalLM on it, an independent
implementation: test_reference_transformers.py.

llama.cpp's src/models/qwen3.cpp: per-head RMSNorm of Q and K (attn_q_norm, attn_k_norm, weights
as stored, eps attention.layer_norm_rms_epsilon) before RoPE, NeoX RoPE (llama_model_rope_type),
scores scaled by 1/sqrt(head_dim), head_dim = attention.key_length (n_rot must equal it), SwiGLU,
no biases in the converter's files (llama.cpp loads them if present), output tied if absent.
"""
import dataclasses
import math

import gguf
import numpy as np
import torch

from selfextend_gguf.gguf_info import read_model_info
from selfextend_gguf.reference import ARCHITECTURES
from selfextend_gguf.settings import SelfExtend, decide


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def test_tiny_qwen3_fixture(tmp_path, tiny_gguf_paths, tiny_qwen3_gguf, tiny_qwen3_reference, make_tiny_gguf):
    r, llama = gguf.GGUFReader(tiny_qwen3_gguf), gguf.GGUFReader(tiny_gguf_paths["f32"])
    assert field(r, "general.architecture") == "qwen3"
    assert field(r, "qwen3.context_length") == 64
    assert field(r, "qwen3.rope.freq_base") == 1e6
    assert field(r, "qwen3.rope.dimension_count") is None  # as the qwen3 converter: llama.cpp takes head_dim
    n_embd, n_head = field(r, "qwen3.embedding_length"), field(r, "qwen3.attention.head_count")
    assert field(r, "qwen3.attention.key_length") == field(r, "qwen3.attention.value_length") == 32 != n_embd // n_head
    assert field(r, "tokenizer.ggml.tokens") == field(llama, "tokenizer.ggml.tokens")
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in r.tensors}
    assert shapes["blk.0.attn_q_norm.weight"] == shapes["blk.1.attn_k_norm.weight"] == (32,)
    assert shapes["blk.0.attn_q.weight"] == (4 * 32, 64) and shapes["blk.0.attn_k.weight"] == (2 * 32, 64)
    assert not any(name.endswith(".bias") for name in shapes)
    hp = tiny_qwen3_reference.hparams
    assert hp.options is ARCHITECTURES["qwen3"] and hp.rope_neox and hp.options.qk_norm
    assert (hp.head_dim, hp.rope_dims, hp.n_head, hp.n_head_kv) == (32, 32, 4, 2)
    assert hp.attention_scale == 1 / math.sqrt(32)
    assert not any(hp.swa_layers) and hp.final_logit_softcapping == 0
    make_tiny_gguf.main([str(tmp_path / "qwen3.gguf"), "--arch", "qwen3"])
    assert (tmp_path / "qwen3.gguf").read_bytes() == tiny_qwen3_gguf.read_bytes()
    assert decide(read_model_info(tiny_qwen3_gguf), 4, 16, 200) == SelfExtend(4, 16)  # not refused


def test_parity_would_notice_a_reference_without_qwen3s_pieces(tiny_qwen3_gguf, tiny_qwen3_reference):
    """llama.cpp's vanilla logits match the reference, and not the reference without the q/k norms or
    with normal (not NeoX) RoPE: the parity tests check these pieces, not only the shapes."""
    from selfextend_gguf.testing.parity import MATTERS, TOLERANCE, random_tokens, reference_logits, tiny_llama

    tokens = random_tokens(60, seed=8)
    llm = tiny_llama(tiny_qwen3_gguf, 64, 1, None, n_batch=64, n_ubatch=32)
    llm.eval(tokens)
    ours = np.asarray(llm.scores[:60])
    ref = tiny_qwen3_reference
    assert np.abs(ours - reference_logits(ref, tokens, 1, None)).max() <= TOLERANCE

    no_norms = ref.to(torch.float64)
    no_norms.layers = [dataclasses.replace(w, q_norm=None, k_norm=None) for w in no_norms.layers]
    normal_rope = ref.to(torch.float64)
    normal_rope.rope = dataclasses.replace(ref.rope, neox=False)
    for wrong in (no_norms, normal_rope):
        assert np.abs(ours - reference_logits(wrong, tokens, 1, None)).max() > MATTERS
