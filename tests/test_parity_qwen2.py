"""Self-Extend on a qwen2-architecture model: the patched llama.cpp against the torch reference.

qwen2 differs from llama where Self-Extend works: llama.cpp rotates its Q and K with NeoX RoPE
(pairs (x[i], x[i + d/2])), so the patch's grouped query, its K re-rotation to k // G and the
mixed cells rotated on the fly all run with LLAMA_ROPE_TYPE_NEOX; and Q and K carry a bias,
added before RoPE. The tiny qwen2 fixture (conftest.py) has the llama fixture's sizes, tokenizer
and F32 weights plus those biases, RoPE base 1e6 and trained context 64; with an F32 KV cache the
bar is the llama parity's: max |logit difference| <= 1e-3 at every position.
"""
import gguf
import numpy as np
import pytest

from selfextend_gguf.gguf_info import read_model_info
# test_parity.py's helpers (pytest puts tests/ on sys.path): the same settings for both architectures
from selfextend_gguf.testing.parity import TOLERANCE, fitting_length, random_tokens, reference_logits, tiny_llama

# (G, W): odd G with W not a multiple of it, even G with W a multiple, W smaller than a ubatch
SETTINGS = [(2, 8), (3, 10), (5, 7)]


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
    assert info.has_rope and info.rope_scaling_type is None

    hp = tiny_qwen2_reference.hparams
    assert hp.architecture == "qwen2" and hp.rope_neox and hp.rope_dims == hp.head_dim == 16
    assert tiny_qwen2_reference.rope.neox and tiny_qwen2_reference.rope.base == 1e6
    assert all(w.bq is not None and w.bk is not None and w.bv is not None for w in tiny_qwen2_reference.layers)


@pytest.mark.parametrize("group_size,window", SETTINGS)
def test_prefill_in_small_ubatches_matches_reference(tiny_qwen2_gguf, tiny_qwen2_reference, group_size, window):
    n = fitting_length(group_size, window)
    tokens = random_tokens(n, seed=group_size)
    llm = tiny_llama(tiny_qwen2_gguf, n, group_size, window, n_batch=64, n_ubatch=32)
    llm.eval(tokens)
    ours = np.asarray(llm.scores[:n])
    expected = reference_logits(tiny_qwen2_reference, tokens, group_size, window)
    error = np.abs(ours - expected).max()
    print(f"qwen2 prefill G={group_size} W={window} n={n}: max |diff| {error:.2e}")
    assert error <= TOLERANCE, f"G={group_size} W={window} n={n}: max |diff| {error:.2e}"
    # Self-Extend changes the result past the window: the test would notice a no-op patch
    vanilla = reference_logits(tiny_qwen2_reference, tokens, 1, None)
    assert np.abs(ours - vanilla).max() > 100 * TOLERANCE


@pytest.mark.parametrize("group_size,window", [(3, 10), (5, 7)])
def test_token_by_token_decode_matches_reference(tiny_qwen2_gguf, tiny_qwen2_reference, group_size, window):
    n = fitting_length(group_size, window, cap=200)
    tokens = random_tokens(n, seed=7)
    llm = tiny_llama(tiny_qwen2_gguf, n, group_size, window, n_batch=32, n_ubatch=32)
    llm.eval(tokens[:40])
    for token in tokens[40:]:  # one llama_decode per token: cells leave the window one at a time
        llm.eval([token])
    ours = np.asarray(llm.scores[:n])
    error = np.abs(ours - reference_logits(tiny_qwen2_reference, tokens, group_size, window)).max()
    print(f"qwen2 decode G={group_size} W={window} n={n}: max |diff| {error:.2e}")
    assert error <= TOLERANCE, f"G={group_size} W={window} n={n}: max |diff| {error:.2e}"
    assert np.abs(ours - reference_logits(tiny_qwen2_reference, tokens, 1, None)).max() > 100 * TOLERANCE


def test_group_size_one_is_vanilla(tiny_qwen2_gguf, tiny_qwen2_reference):
    tokens = random_tokens(60, seed=8)
    llm = tiny_llama(tiny_qwen2_gguf, 64, 1, None)
    llm.eval(tokens)
    assert llm.grp_attn_n == 1
    error = np.abs(np.asarray(llm.scores[:60]) - reference_logits(tiny_qwen2_reference, tokens, 1, None)).max()
    print(f"qwen2 vanilla n=60: max |diff| {error:.2e}")
    assert error <= TOLERANCE
