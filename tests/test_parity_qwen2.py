"""Self-Extend on a qwen2-architecture model: the patched llama.cpp against the torch reference.

qwen2 differs from llama where Self-Extend works: llama.cpp rotates its Q and K with NeoX RoPE
(pairs (x[i], x[i + d/2])), so the patch's grouped query, its K re-rotation to k // G and the
mixed cells rotated on the fly all run with LLAMA_ROPE_TYPE_NEOX; and Q and K carry a bias,
added before RoPE. The tiny qwen2 fixture (conftest.py) has the llama fixture's sizes, tokenizer
and F32 weights plus those biases, RoPE base 1e6 and trained context 64; with an F32 KV cache the
bar is the llama parity's: max |logit difference| <= 1e-3 at every position. Its prefill, decode and
G = 1 cases are in test_parity_architectures.py; here, that the fixture is what it must be.
"""
import gguf

from selfextend_gguf.gguf_info import read_model_info



def test_tiny_qwen2_file_is_qwen2(tiny_qwen2_gguf, tiny_qwen2_reference):
    """The fixture is what llama.cpp's qwen2 loader reads, and the reference and gguf_info see it
    as such (qwen2.* keys, NeoX RoPE, biases)."""
    reader = gguf.GGUFReader(tiny_qwen2_gguf)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.context_length"].contents() == 64
    assert "qwen2.rope.dimension_count" not in reader.fields  # as llama.cpp's converter writes qwen2
    names = {t.name for t in reader.tensors}
    assert {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"} <= names

    info = read_model_info(tiny_qwen2_gguf)
    assert (info.architecture, info.n_ctx_train, info.rope_freq_base) == ("qwen2", 64, 1e6)
    assert info.self_extend_refusal is None and info.rope_scaling_type is None

    hp = tiny_qwen2_reference.hparams
    assert hp.architecture == "qwen2" and hp.rope_neox and hp.rope_dims == hp.head_dim == 16
    assert tiny_qwen2_reference.rope.neox and tiny_qwen2_reference.rope.base == 1e6
    assert all(w.bq is not None and w.bk is not None and w.bv is not None for w in tiny_qwen2_reference.layers)
