"""Self-Extend on Gemma 3 (iSWA KV cache): the patched llama.cpp against the torch reference.

llama.cpp keeps Gemma 3's sliding-window layers in their own KV cache and applies Self-Extend to
the global layers only; the reference (reference/model.py) does the same, and
test_reference_gemma3.py shows that this equals Self-Extend on every layer when W >= n_swa, the
only settings llama.cpp accepts. The tiny fixture (conftest.py): 4 layers, 0 and 2 sliding (n_swa
10), 1 and 3 global, trained context 64, F32 weights; with an F32 KV cache the bar is the llama
parity's, max |logit difference| <= 1e-3 at every position. The reference reproduces llama.cpp's CPU
GELU (a float16 table, reference/model.py gelu_ggml_cpu): with the exact GELU the tiny model's
logits move by up to ~8e-4 (measured), too close to the bar. Its prefill (swa_full on and off),
decode and G = 1 cases are in test_parity_architectures.py; here, what is Gemma 3's own.
"""
import numpy as np
import pytest
import torch

from selfextend_gguf import Llama, settings
from selfextend_gguf._native import load_llama_cpp
from selfextend_gguf.gguf_info import read_model_info
from selfextend_gguf.reference import ARCHITECTURES, ReferenceModel
from selfextend_gguf.testing.parity import TOLERANCE, fitting_length, random_tokens, reference_logits, tiny_llama

llama_cpp = load_llama_cpp()

N_SWA = 10


@pytest.fixture(scope="module")
def reference(tiny_gemma3_cpu_gelu_reference):
    return tiny_gemma3_cpu_gelu_reference


def max_error(llm, reference, tokens, group_size, window):
    n = len(tokens)
    return np.abs(np.asarray(llm.scores[:n]) - reference_logits(reference, tokens, group_size, window)).max()


def test_regrouped_global_cache_matches_reference(tmp_path, make_tiny_gguf):
    """Two layers, 0 sliding and 1 global: the cached K and V of both depend on no Self-Extend
    attention, so a cache filled with one G and switched to another (llama_set_self_extend
    re-rotates the global layer's grouped K; the sliding layer's cache is left alone) must give
    exactly the reference's logits for the new G from then on."""
    path = make_tiny_gguf.write_tiny_gemma3(tmp_path / "two-layer-gemma3.gguf", n_layer=2)
    reference = ReferenceModel.from_gguf(path, dtype=torch.float64, ffn_gelu="ggml_cpu")
    assert reference.hparams.swa_layers == (True, False)
    tokens = random_tokens(200, seed=9)
    llm = tiny_llama(path, 200, 4, 12, n_batch=64, n_ubatch=64)
    llm.eval(tokens[:120])
    llm.set_self_extend(5, 10)
    llm.eval(tokens[120:])
    expected = reference_logits(reference, tokens, 5, 10)[120:]
    assert np.abs(np.asarray(llm.scores[120:200]) - expected).max() <= TOLERANCE


def test_window_smaller_than_sliding_window_is_refused_before_loading(tiny_gemma3_gguf, monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("llama_cpp.Llama.__init__ ran: the settings were not checked first")

    with monkeypatch.context() as patch:
        patch.setattr(llama_cpp.Llama, "__init__", no_allocation)
        with pytest.raises(ValueError, match=r"sliding window \(10 tokens\).*grp_attn_w >= 10"):
            Llama(str(tiny_gemma3_gguf), n_ctx=200, grp_attn_n=5, grp_attn_w=9, verbose=False)


def test_live_switch_to_a_small_window_is_refused(tiny_gemma3_gguf):
    llm = tiny_llama(tiny_gemma3_gguf, 200, 5, 10)
    with pytest.raises(ValueError, match="sliding window"):
        llm.set_self_extend(5, 8)
    assert llm._lib.llama_set_self_extend(llm._ctx.ctx, 5, 8) == -1  # the library refuses it too
    assert (llm.grp_attn_n, llm.grp_attn_w) == (5, 10)


def test_auto_picks_a_window_of_at_least_the_sliding_window(tiny_gemma3_gguf, reference):
    """min(1024, L/8) would be 8 here, below n_swa = 10."""
    n = 200
    llm = Llama(str(tiny_gemma3_gguf), n_ctx=n, grp_attn_n="auto", logits_all=True, n_batch=64, n_ubatch=32,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                n_threads=2, n_threads_batch=2, verbose=False)
    group_size, window = llm.grp_attn_n, llm.grp_attn_w
    assert window == N_SWA and group_size > 1
    assert (group_size, window) == (settings.resolve("auto", None, n, 64, N_SWA).group_size, N_SWA)
    tokens = random_tokens(n, seed=11)
    llm.eval(tokens)
    assert max_error(llm, reference, tokens, group_size, window) <= TOLERANCE
    # and a window given with "auto" must still cover the sliding window
    with pytest.raises(ValueError, match="sliding window"):
        Llama(str(tiny_gemma3_gguf), n_ctx=n, grp_attn_n="auto", grp_attn_w=6, verbose=False)


def test_default_window_covers_sliding_window(tiny_gemma3_gguf):
    llm = tiny_llama(tiny_gemma3_gguf, 200, 6, None)  # grp_attn_w not given
    assert (llm.grp_attn_n, llm.grp_attn_w) == (6, N_SWA)


@pytest.mark.parametrize("fixture", ["tiny_f32_gguf", "tiny_qwen2_gguf"])
def test_models_without_sliding_window_are_unaffected(request, fixture):
    """The llama and qwen2 fixtures have no sliding window: no W >= n_swa rule, W below 10 (the
    gemma3 fixture's n_swa) is fine and exact, and ReferenceModel.from_gguf still gives their plain
    decoder (no sliding layers, none of Gemma 3's options)."""
    path = request.getfixturevalue(fixture)
    assert read_model_info(path).sliding_window is None
    assert settings.default_window(64, None) == 8
    reference = ReferenceModel.from_gguf(path, dtype=torch.float64)
    hp = reference.hparams
    assert hp.options is ARCHITECTURES[hp.architecture] != ARCHITECTURES["gemma3"]
    assert (hp.sliding_window, any(hp.swa_layers), hp.options.qk_norm, hp.options.post_norms) == (0,) + (False,) * 3
    group_size, window = 3, 6
    n = fitting_length(group_size, window, cap=150)
    tokens = random_tokens(n, seed=12)
    llm = tiny_llama(path, n, group_size, window, n_batch=64, n_ubatch=32)
    assert (llm.grp_attn_n, llm.grp_attn_w) == (group_size, window)
    llm.eval(tokens)
    assert max_error(llm, reference, tokens, group_size, window) <= TOLERANCE
