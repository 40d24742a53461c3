"""Exact Self-Extend against the torch reference on each architecture's tiny model (F32 weights, F32
KV cache, trained context 64; the bar: max |logit difference| <= 1e-3 at every position): prefill in
ubatches smaller than the prompt, token-by-token decode across window and group boundaries, and
G = 1 (plain llama.cpp). What only one architecture has stays in its own file: test_parity.py
(llama: flash attention, rewinds, states, several sequences, RoPE scaling), test_parity_qwen2.py,
test_parity_gemma2.py (soft-capping with flash attention), test_parity_gemma3.py (sliding-window layers),
test_parity_phi3.py (LongRoPE: its factors depend on n_ctx, G and W). qwen3's prefill cases run with and
without flash attention (heads of 32: another head size than the llama fixture's 16).

    llama   the llama fixture
    qwen2   the same weights plus Q/K/V biases, NeoX RoPE, RoPE base 1e6
    qwen3   per-head q/k RMSNorms before RoPE, NeoX RoPE, RoPE base 1e6, no biases, heads of 32
            (attention.key_length) though n_embd / n_head is 16
    gemma2  gemma3's layers without q/k norms, attention logit soft-capping at 2 (the tiny model's scores
            reach it: a block of scores left uncapped would show), final logit soft-capping
    phi2    LayerNorms with biases, attention and an ungated GELU FFN in parallel, fused QKV, biases on
            every projection and the logits, partial rotary (NeoX RoPE on 8 of each head's 16 dimensions);
            its prefill cases run with and without flash attention
    gemma3  sliding-window and global layers (n_swa 10), q/k norms; W must be >= n_swa, and
            swa_full=False gives the sliding layers their own small cache
"""
import numpy as np
import pytest

from selfextend_gguf.testing.parity import (MATTERS, TOLERANCE, fitting_length, noise_bar, prefill_then_decode,
                                            random_tokens, reference_logits, tiny_llama)

# per architecture: the (G, W) of the prefill and decode cases (odd G with W not a multiple of it,
# W below and above a ubatch; gemma3's W >= n_swa), the decode length cap, the vanilla length,
# and Llama arguments that the prefill cases run under (each a case of its own)
ARCHITECTURES = {
    "llama": dict(prefill=[(2, 8), (3, 10), (4, 16), (5, 7), (8, 12)], decode=[(3, 10), (4, 16)], decode_cap=200,
                  n_vanilla=60, prefill_variants=[{}], decode_kwargs={}),
    "qwen2": dict(prefill=[(2, 8), (3, 10), (5, 7)], decode=[(3, 10), (5, 7)], decode_cap=200,
                  n_vanilla=60, prefill_variants=[{}], decode_kwargs={}),
    "qwen3": dict(prefill=[(2, 8), (3, 10), (5, 7)], decode=[(3, 10), (5, 7)], decode_cap=200,
                  n_vanilla=60, prefill_variants=[{}, {"flash_attn": True}], decode_kwargs={}),
    "gemma2": dict(prefill=[(2, 10), (3, 10), (5, 11)], decode=[(3, 10)], decode_cap=300,
                   n_vanilla=200, prefill_variants=[{"swa_full": True}, {"swa_full": False}],
                   decode_kwargs={"swa_full": False}),
    "phi2": dict(prefill=[(2, 8), (3, 10), (5, 7)], decode=[(3, 10), (5, 7)], decode_cap=200,
                 n_vanilla=60, prefill_variants=[{}, {"flash_attn": True}], decode_kwargs={}),
    "gemma3": dict(prefill=[(2, 10), (3, 10), (4, 16), (5, 11), (7, 12)], decode=[(3, 10), (5, 11)], decode_cap=300,
                   n_vanilla=200, prefill_variants=[{"swa_full": True}, {"swa_full": False}],
                   decode_kwargs={"swa_full": False}),
}
FIXTURES = {"llama": ("tiny_f32_gguf", "tiny_reference"), "qwen2": ("tiny_qwen2_gguf", "tiny_qwen2_reference"),
            "qwen3": ("tiny_qwen3_gguf", "tiny_qwen3_reference"),
            "gemma2": ("tiny_gemma2_gguf", "tiny_gemma2_cpu_gelu_reference"),
            "phi2": ("tiny_phi2_gguf", "tiny_phi2_cpu_gelu_reference"),
            "gemma3": ("tiny_gemma3_gguf", "tiny_gemma3_cpu_gelu_reference")}


def model(request, arch):
    """(GGUF path, reference) of the architecture's tiny model."""
    path, reference = FIXTURES[arch]
    return request.getfixturevalue(path), request.getfixturevalue(reference)


def prefill_cases():
    for arch, spec in ARCHITECTURES.items():
        for group_size, window in spec["prefill"]:
            for kwargs in spec["prefill_variants"]:
                label = "-".join(f"{k}={v}" for k, v in kwargs.items())
                yield pytest.param(arch, group_size, window, kwargs, id=f"{arch}-G{group_size}-W{window}" +
                                   (f"-{label}" if label else ""))


def decode_cases():
    for arch, spec in ARCHITECTURES.items():
        for group_size, window in spec["decode"]:
            yield pytest.param(arch, group_size, window, id=f"{arch}-G{group_size}-W{window}")


@pytest.mark.parametrize("arch,group_size,window,kwargs", list(prefill_cases()))
def test_prefill_in_small_ubatches_matches_reference(request, arch, group_size, window, kwargs):
    path, reference = model(request, arch)
    n = fitting_length(group_size, window)
    tokens = random_tokens(n, seed=group_size)
    llm = tiny_llama(path, n, group_size, window, n_batch=64, n_ubatch=32, **kwargs)
    assert (llm.grp_attn_n, llm.grp_attn_w) == (group_size, window)
    llm.eval(tokens)
    ours = np.asarray(llm.scores[:n])
    error = np.abs(ours - reference_logits(reference, tokens, group_size, window)).max()
    print(f"{arch} prefill G={group_size} W={window} n={n} {kwargs}: max |diff| {error:.2e}")
    assert error <= TOLERANCE, f"G={group_size} W={window} n={n}: max |diff| {error:.2e}"
    # Self-Extend changes the result past the window: the test would notice a no-op patch
    assert np.abs(ours - reference_logits(reference, tokens, 1, None)).max() > MATTERS


@pytest.mark.parametrize("arch,group_size,window", list(decode_cases()))
def test_token_by_token_decode_matches_reference(request, arch, group_size, window):
    path, reference = model(request, arch)
    spec = ARCHITECTURES[arch]
    n = fitting_length(group_size, window, cap=spec["decode_cap"])
    tokens = random_tokens(n, seed=7)
    llm = tiny_llama(path, n, group_size, window, n_batch=32, n_ubatch=32, **spec["decode_kwargs"])
    llm.eval(tokens[:40])
    for token in tokens[40:]:  # one llama_decode per token: cells leave the window one at a time
        llm.eval([token])
    ours = np.asarray(llm.scores[:n])
    error = np.abs(ours - reference_logits(reference, tokens, group_size, window)).max()
    print(f"{arch} decode G={group_size} W={window} n={n}: max |diff| {error:.2e}")
    assert error <= TOLERANCE, f"G={group_size} W={window} n={n}: max |diff| {error:.2e}"
    assert np.abs(ours - reference_logits(reference, tokens, 1, None)).max() > MATTERS


def prefill_then_decode_logits(path, tokens, group_size, window, flash_attn, kwargs) -> np.ndarray:
    """Prefill in ubatches of 32, then the last 20 tokens one llama_decode each."""
    llm = tiny_llama(path, len(tokens), group_size, window, n_batch=64, n_ubatch=32, flash_attn=flash_attn, **kwargs)
    return prefill_then_decode(llm, tokens, 20)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_error_is_within_twice_the_same_case_with_self_extend_off(request, arch, flash_attn):
    """The per-case bar: Self-Extend's max |logit error| is at most twice the error of the same case
    (tokens, F32 cache, schedule, device) with Self-Extend off, plus the CPU's 1e-3. On the CPU both are
    float32 rounding; on a device with a rounding of its own (lavapipe: tests/test_vulkan.py runs this
    file there) it is the bar that fits the device, case by case."""
    path, reference = model(request, arch)
    spec = ARCHITECTURES[arch]
    group_size, window = spec["decode"][0]
    n = fitting_length(group_size, window, cap=200)
    tokens = random_tokens(n, seed=13)
    on = prefill_then_decode_logits(path, tokens, group_size, window, flash_attn, spec["decode_kwargs"])
    off = prefill_then_decode_logits(path, tokens, 1, None, flash_attn, spec["decode_kwargs"])
    on_error = np.abs(on - reference_logits(reference, tokens, group_size, window)).max()
    off_error = np.abs(off - reference_logits(reference, tokens, 1, None)).max()
    figures = (f"per case: {arch}, {'flash' if flash_attn else 'no flash'}, G={group_size} W={window} n={n}: "
               f"max |diff| off {off_error:.2e}, on {on_error:.2e}")
    print(figures)
    assert on_error <= noise_bar(off_error), figures
    assert np.abs(on - off).max() > MATTERS, figures  # Self-Extend ran


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_group_size_one_is_vanilla(request, arch):
    path, reference = model(request, arch)
    n = ARCHITECTURES[arch]["n_vanilla"]
    tokens = random_tokens(n, seed=8)
    llm = tiny_llama(path, max(n, 64), 1, None, n_batch=64, n_ubatch=32)
    llm.eval(tokens)
    assert llm.grp_attn_n == 1
    error = np.abs(np.asarray(llm.scores[:n]) - reference_logits(reference, tokens, 1, None)).max()
    print(f"{arch} vanilla n={n}: max |diff| {error:.2e}")
    assert error <= TOLERANCE


def test_mistral_style_sliding_window_key_is_full_attention(tmp_path, make_tiny_gguf, tiny_reference):
    """A llama GGUF that carries attention.sliding_window (as Mistral-style conversions may): llama.cpp's
    llama ignores the key and attends to every cached token, so Self-Extend needs no W >= n_swa and
    matches the reference's full attention (the tiny llama's weights, with the key added)."""
    from selfextend_gguf.gguf_info import read_model_info
    path = make_tiny_gguf.write_tiny_llama(tmp_path / "mistral-style.gguf", weight_type="f32", sliding_window=12)
    assert read_model_info(path).sliding_window is None
    group_size, window = 4, 8  # W below the key's 12: accepted
    n = fitting_length(group_size, window)
    tokens = random_tokens(n, seed=5)
    llm = tiny_llama(path, n, group_size, window, n_batch=64, n_ubatch=32)
    llm.eval(tokens)
    ours = np.asarray(llm.scores[:n])
    assert np.abs(ours - reference_logits(tiny_reference, tokens, group_size, window)).max() <= TOLERANCE
