"""The patched llama.cpp against the torch reference: exact Self-Extend logits at every position.

The tiny fixture has F32 weights and the KV cache is F32 here, so llama.cpp computes what the
float64 reference computes up to float32 rounding; the bar is max |logit difference| <= 1e-3.
Its trained context is 64 tokens: every case below runs past it, across many windows and groups.
The prefill, decode and G = 1 cases of every architecture are in test_parity_architectures.py.
"""
import numpy as np
import pytest
import torch

from native_build import main_lib_dir, run_with_library
from selfextend_gguf.testing.parity import (MATTERS, TOLERANCE, fitting_length, llama_cpp, prefill_then_decode,
                                            random_tokens, reference_logits, tiny_llama)


def test_long_context_across_cell_pages_matches_reference(tiny_f32_gguf, tiny_reference):
    """900 tokens, 14x the trained context: the grouped, window and mixed cell ranges of the patch
    start on 256-cell pages other than the first, the first ubatch lies wholly inside the window
    (no grouped cells yet), then single-token decode steps slide the window across a page."""
    group_size, window = 36, 40
    n = fitting_length(group_size, window, cap=900)
    assert n == 900
    tokens = random_tokens(n, seed=10)
    llm = tiny_llama(tiny_f32_gguf, n, group_size, window, n_batch=96, n_ubatch=32)
    llm.eval(tokens[:740])
    for token in tokens[740:]:
        llm.eval([token])
    error = np.abs(np.asarray(llm.scores[:n]) - reference_logits(tiny_reference, tokens, group_size, window)).max()
    assert error <= TOLERANCE, f"max |diff| {error:.2e}"


def flash_attention_logits(path, tokens, group_size, window, n_ubatch) -> list:
    """Logits with flash attention: prefill ubatches, then the last 20 tokens one at a time."""
    llm = tiny_llama(path, len(tokens), group_size, window, n_batch=96, n_ubatch=n_ubatch, flash_attn=True)
    return prefill_then_decode(llm, tokens, 20).tolist()


@pytest.mark.parametrize("device_paths", ["cpu", "no_flash_lse", "fallbacks"])
@pytest.mark.parametrize("group_size,window,n_ubatch", [(4, 16, 32), (3, 10, 64), (2, 8, 7), (8, 40, 32)])
def test_flash_attention_matches_reference(tiny_f32_gguf, tiny_reference, group_size, window, n_ubatch,
                                           device_paths):
    """flash_attn=True, prefill ubatches, then the last 20 tokens as single-token decode steps.
    "cpu": one ggml_flash_attn_ext_lse per block of cells, merged by log-sum-exp, for prefill and decode
    alike. The other two run, in a child process, with every layer on a device without it
    (native_build.LIMITED_DEVICES: the CPU's kernels behind a device that refuses some operations):
    "no_flash_lse", prefill through one flash attention over the doubled head size with V at its own
    size, decode steps read V with out_prod; "fallbacks", V padded to the doubled head size and
    transposed for decode steps."""
    n = fitting_length(group_size, window)
    tokens = random_tokens(n, seed=group_size)
    args = (str(tiny_f32_gguf), tokens, group_size, window, n_ubatch)
    if device_paths == "cpu":
        logits = flash_attention_logits(*args)
    else:
        logits = run_with_library(main_lib_dir(), "test_parity", "flash_attention_logits", *args, limited_device=device_paths)
    error = np.abs(np.asarray(logits) - reference_logits(tiny_reference, tokens, group_size, window)).max()
    assert error <= TOLERANCE, f"G={group_size} W={window} n={n}: max |diff| {error:.2e}"


def test_flash_attention_over_long_blocks_matches_reference(tiny_f32_gguf, tiny_reference):
    """900 tokens with W = 40: decode steps see a block of over 512 grouped cells, which ggml's CPU
    flash attention splits across threads (its split-KV path, whose partial results patch 0004 merges
    into the log-sum-exp); prefill ubatches of 64 take its tiled path."""
    group_size, window = 36, 40
    tokens = random_tokens(fitting_length(group_size, window, cap=900), seed=12)
    assert len(tokens) - 20 - window > 512
    logits = flash_attention_logits(str(tiny_f32_gguf), tokens, group_size, window, 64)
    error = np.abs(np.asarray(logits) - reference_logits(tiny_reference, tokens, group_size, window)).max()
    assert error <= TOLERANCE, f"max |diff| {error:.2e}"


def test_rope_scaling_in_the_gguf_composes(tmp_path, make_tiny_gguf):
    """A GGUF with linear RoPE scaling (factor 2) and per-frequency factors (rope_freqs.weight):
    the grouped query and the re-rotated keys use the layer's own scaled RoPE, so Self-Extend on
    top of it matches the reference, which applies the same scaling to the grouped positions."""
    from selfextend_gguf.reference import ReferenceModel
    path = make_tiny_gguf.write_tiny_llama(tmp_path / "scaled.gguf", weight_type="f32",
                                           rope_scaling="linear", rope_scaling_factor=2.0,
                                           rope_freq_factors=True)
    reference = ReferenceModel.from_gguf(path, dtype=torch.float64)
    assert reference.rope.freq_scale == 0.5 and reference.rope.freq_factors is not None
    group_size, window = 4, 16
    n = fitting_length(group_size, window)
    tokens = random_tokens(n, seed=11)
    llm = tiny_llama(path, n, group_size, window, n_batch=64, n_ubatch=32)
    logits = prefill_then_decode(llm, tokens, 20)
    expected = reference_logits(reference, tokens, group_size, window)
    error = np.abs(logits - expected).max()
    assert error <= TOLERANCE, f"max |diff| {error:.2e}"
    unscaled = ReferenceModel.from_gguf(make_tiny_gguf.write_tiny_llama(tmp_path / "plain.gguf", weight_type="f32"),
                                        dtype=torch.float64)
    assert np.abs(expected - reference_logits(unscaled, tokens, group_size, window)).max() > MATTERS


def test_yarn_gguf_is_refused_with_the_fix(tmp_path, make_tiny_gguf):
    path = make_tiny_gguf.write_tiny_llama(tmp_path / "yarn.gguf", weight_type="f32", rope_scaling="yarn",
                                           rope_scaling_factor=4.0)
    with pytest.raises(ValueError, match="YaRN"):
        tiny_llama(path, 200, 4, 16)


def test_rewind_and_reevaluate_matches_reference(tiny_f32_gguf, tiny_reference):
    group_size, window = 4, 16
    first, second = random_tokens(200, seed=1), random_tokens(200, seed=2)
    llm = tiny_llama(tiny_f32_gguf, 200, group_size, window, n_batch=64, n_ubatch=64)
    llm.eval(first)
    llm.n_tokens = 90  # llama-cpp-python's rewind: the next eval removes cells 90.. (seq_rm)
    llm.eval(second[:110])
    tokens = first[:90] + second[:110]
    error = np.abs(np.asarray(llm.scores[:200]) - reference_logits(tiny_reference, tokens, group_size, window)).max()
    assert error <= TOLERANCE


def test_state_save_load_and_regroup(tiny_f32_gguf):
    """A state saved with G=4 continues identically when loaded back, and is re-rotated when
    loaded into a context with another group size (as llama_set_self_extend re-rotates a live cache)."""
    tokens = random_tokens(150, seed=3)
    llm = tiny_llama(tiny_f32_gguf, 150, 4, 16, n_batch=64, n_ubatch=64)
    llm.eval(tokens[:100])
    state = llm.save_state()
    llm.eval(tokens[100:])
    straight = np.asarray(llm.scores[100:150]).copy()

    llm.load_state(state)
    llm.eval(tokens[100:])
    assert np.array_equal(np.asarray(llm.scores[100:150]), straight)

    # K cached at k // 4 must be moved to k // 3: once by loading into a G=3 context,
    # once by switching the live context to G=3; both must agree
    other = tiny_llama(tiny_f32_gguf, 150, 3, 10, n_batch=64, n_ubatch=64)
    other.load_state(state)
    assert (other.grp_attn_n, other.grp_attn_w) == (3, 10)
    other.eval(tokens[100:])
    llm.load_state(state)
    llm.set_self_extend(3, 10)
    llm.eval(tokens[100:])
    regrouped = np.asarray(other.scores[100:150])
    assert np.abs(regrouped - np.asarray(llm.scores[100:150])).max() <= TOLERANCE
    assert np.abs(regrouped - straight).max() > MATTERS


def test_group_size_switch_on_empty_cache_matches_reference(tiny_f32_gguf, tiny_reference):
    tokens = random_tokens(150, seed=4)
    llm = tiny_llama(tiny_f32_gguf, 150, 1, None, n_batch=64, n_ubatch=64)
    llm.set_self_extend(3, 10)
    llm.eval(tokens)
    assert np.abs(np.asarray(llm.scores[:150]) - reference_logits(tiny_reference, tokens, 3, 10)).max() <= TOLERANCE


def test_two_sequences_in_one_batch(tiny_f32_gguf, tiny_reference):
    """Two sequences decoded in the same llama_batch, in a unified cache and in one stream each."""
    group_size, window, n = 4, 16, 100
    seqs = [random_tokens(n, seed=5), random_tokens(n, seed=6)]
    expected = [reference_logits(tiny_reference, s, group_size, window) for s in seqs]
    llm = tiny_llama(tiny_f32_gguf, 2 * n, 1, None, n_batch=2 * n, n_ubatch=2 * n)
    for unified in (True, False):
        params = llm.context_params
        params.n_seq_max, params.kv_unified, params.n_ctx = 2, unified, 2 * n
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        try:
            assert llm._lib.llama_set_self_extend(ctx, group_size, window) == 0
            batch = llama_cpp.llama_batch_init(2 * n, 0, 1)
            for s, seq in enumerate(seqs):
                for i, token in enumerate(seq):
                    j = s * n + i
                    batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, i, 1, True
                    batch.seq_id[j][0] = s
            batch.n_tokens = 2 * n
            assert llama_cpp.llama_decode(ctx, batch) == 0
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(2 * n * 320,)).reshape(2 * n, 320)
            for s in range(2):
                error = np.abs(logits[s * n:(s + 1) * n] - expected[s]).max()
                assert error <= TOLERANCE, f"unified={unified} seq {s}: {error:.2e}"
            llama_cpp.llama_batch_free(batch)
        finally:
            llama_cpp.llama_free(ctx)


def test_regrouped_cache_matches_reference(tmp_path, make_tiny_gguf):
    """With one layer the cached K and V do not depend on the attention that produced them, so a
    cache filled with G=1 and switched to G=3 (re-rotated from k to k // 3) must give exactly the
    reference's G=3 logits from then on. Checks the K-shift that keeps grouped K up to date."""
    from selfextend_gguf.reference import ReferenceModel
    path = make_tiny_gguf.write_tiny_llama(tmp_path / "one-layer.gguf", weight_type="f32", n_layer=1)
    reference = ReferenceModel.from_gguf(path, dtype=torch.float64)
    tokens = random_tokens(150, seed=9)
    llm = tiny_llama(path, 150, 1, None, n_batch=64, n_ubatch=64)
    llm.eval(tokens[:100])
    llm.set_self_extend(3, 10)
    llm.eval(tokens[100:])
    expected = reference_logits(reference, tokens, 3, 10)[100:]
    assert np.abs(np.asarray(llm.scores[100:150]) - expected).max() <= TOLERANCE
    llm.set_self_extend(5, 7)  # and again, from k // 3 to k // 5
    llm.n_tokens = 120
    llm.eval(tokens[120:])
    expected = reference_logits(reference, tokens, 5, 7)[120:]
    assert np.abs(np.asarray(llm.scores[120:150]) - expected).max() <= TOLERANCE
