"""Self-Extend on Phi-3 (phi3) against the torch reference, at the usual bar (max |logit difference| <= 1e-3):
prefill in ubatches smaller than the prompt (flash attention on and off), token-by-token decode, a rewind,
G = 1, live switches of G, and the choice of LongRoPE's factors.

The tiny fixture (conftest.py, write_tiny_phi3) has a fused attn_qkv and ffn_up, partial rotary (RoPE on 12
of 16 dimensions), and LongRoPE: short factors in [1, 1.2], long ones in [2, 8], an original context of 32
and an attention factor of 1.095, which scales every RoPE rotation. llama.cpp takes the long factors where
the context is longer than the original one (every context here: llama.cpp rounds n_ctx up to 256 cells).
With Self-Extend on, the patch reads the span Self-Extend rotates instead, (n_ctx - 1) // G + W - W // G + 1,
and takes the short factors where it stays within the original context (llama_model::get_rope_factors,
ReferenceModel.global_rope):

    G    W    n_ctx   span   factors
    1    -    256     256    long
    3    10   256      93    long
    5    7    256      58    long
    16   4    256      20    short
    12   5    256      27    short

Every test runs at n_ctx 256 (tokens <= 256), the context the reference fixture is built for.
"""
import copy

import numpy as np
import pytest
import torch

from selfextend_gguf.reference import ReferenceModel
from selfextend_gguf.testing.parity import MATTERS, TOLERANCE, fitting_length, random_tokens, reference_logits, tiny_llama

N_CTX = 256               # llama.cpp's context for every n below (n_ctx rounded up to 256 cells)
LONG = [(3, 10), (5, 7)]  # (G, W) whose span exceeds the original context of 32: the long factors
SHORT = [(16, 4), (12, 5)]  # (G, W) that keep every distance within it: the short factors


@pytest.fixture(scope="module")
def reference(tiny_phi3_gguf):
    """The tiny Phi-3 in float64 at llama.cpp's context of 256 cells, which picks the LongRoPE factors."""
    return ReferenceModel.from_gguf(tiny_phi3_gguf, dtype=torch.float64, n_ctx=N_CTX)


def with_factors(reference, which):
    """A copy of the reference that uses LongRoPE's `which` ("short" or "long") factors whatever its rule says."""
    fixed = copy.copy(reference)
    fixed.rope = fixed.rope_long = {"short": reference.rope, "long": reference.rope_long}[which]
    return fixed


def max_error(llm, reference, tokens, group_size, window, first=0):
    """max |logit difference| of llm's logits for tokens[first:] from the reference's."""
    assert llm.n_ctx() == reference.n_ctx
    n = len(tokens)
    expected = reference_logits(reference, tokens, group_size, window)[first:]
    return np.abs(np.asarray(llm.scores[first:n]) - expected).max()


def check_self_extend(llm, reference, tokens, group_size, window, label):
    """llm matches the reference, and Self-Extend moved the logits (a no-op patch would not pass)."""
    error = max_error(llm, reference, tokens, group_size, window)
    print(f"phi3 {label} G={group_size} W={window} n={len(tokens)}: max |diff| {error:.2e}")
    assert error <= TOLERANCE, f"{label} G={group_size} W={window}: max |diff| {error:.2e}"
    assert max_error(llm, reference, tokens, 1, None) > MATTERS


def test_fixture_carries_longrope(reference):
    hp = reference.hparams
    assert (hp.architecture, hp.n_ctx_train, hp.n_ctx_orig, hp.rope_dims, hp.head_dim) == ("phi3", 64, 32, 12, 16)
    assert hp.rope_attn_factor == pytest.approx(1.0954, abs=1e-4)
    assert hp.sliding_window == 0  # the file says 12: llama.cpp turns Phi-3's sliding window off
    assert reference.rope.freq_factors.max() <= 1.2 and reference.rope_long.freq_factors.min() >= 2.0


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("group_size,window", LONG + SHORT)
def test_prefill_in_small_ubatches_matches_reference(tiny_phi3_gguf, reference, group_size, window, flash_attn):
    n = fitting_length(group_size, window, cap=200)
    tokens = random_tokens(n, seed=group_size)
    llm = tiny_llama(tiny_phi3_gguf, n, group_size, window, n_batch=64, n_ubatch=32, flash_attn=flash_attn)
    llm.eval(tokens)
    check_self_extend(llm, reference, tokens, group_size, window, f"prefill flash_attn={flash_attn}")


@pytest.mark.parametrize("group_size,window", [LONG[0], SHORT[0]])
def test_token_by_token_decode_matches_reference(tiny_phi3_gguf, reference, group_size, window):
    n = fitting_length(group_size, window, cap=200)
    tokens = random_tokens(n, seed=7)
    llm = tiny_llama(tiny_phi3_gguf, n, group_size, window, n_batch=32, n_ubatch=32)
    llm.eval(tokens[:40])
    for token in tokens[40:]:  # one llama_decode per token: cells leave the window one at a time
        llm.eval([token])
    check_self_extend(llm, reference, tokens, group_size, window, "decode")


@pytest.mark.parametrize("group_size,window", [LONG[1], SHORT[0]])
def test_rewind_and_reevaluate_matches_reference(tiny_phi3_gguf, reference, group_size, window):
    first, second = random_tokens(200, seed=1), random_tokens(200, seed=2)
    llm = tiny_llama(tiny_phi3_gguf, 200, group_size, window, n_batch=64, n_ubatch=64)
    llm.eval(first)
    llm.n_tokens = 90  # llama-cpp-python's rewind: the next eval removes cells 90.. (seq_rm)
    llm.eval(second[:110])
    check_self_extend(llm, reference, first[:90] + second[:110], group_size, window, "rewind")


def test_group_size_one_is_vanilla(tiny_phi3_gguf, reference):
    tokens = random_tokens(60, seed=8)
    llm = tiny_llama(tiny_phi3_gguf, 64, 1, None, n_batch=64, n_ubatch=32)
    llm.eval(tokens)
    assert llm.grp_attn_n == 1
    error = max_error(llm, reference, tokens, 1, None)
    print(f"phi3 vanilla n=60: max |diff| {error:.2e}")
    assert error <= TOLERANCE


# (the file's original context, G, W, the n_ctx asked for, the factors llama.cpp must use); llama.cpp rounds
# n_ctx 150 up to 256 cells, 300 to 512
FACTOR_CASES = [
    (32, 1, None, 150, "long"),    # llama.cpp's own rule: 256 > 32
    (32, 3, 10, 150, "long"),      # Self-Extend's span 93 > 32
    (32, 16, 4, 150, "short"),     # span 20 <= 32: within the original context
    (256, 1, None, 150, "short"),  # llama.cpp's own rule: 256 <= 256
    (256, 1, None, 300, "long"),   # 512 > 256
    (256, 3, 10, 300, "short"),    # the same context with Self-Extend: span 178 <= 256
]


@pytest.mark.parametrize("original_context,group_size,window,n_ctx,factors", FACTOR_CASES)
def test_longrope_factors_as_llama_cpp_picks_them(tmp_path, make_tiny_gguf, original_context, group_size, window,
                                                 n_ctx, factors):
    """llama.cpp matches the reference with the factors of the rule and is far from it with the other ones,
    and the reference's rule (global_rope) picks the same. The files differ in their metadata only."""
    path = make_tiny_gguf.write_tiny_phi3(tmp_path / "phi3.gguf", n_ctx_train=2 * original_context,
                                          original_context_length=original_context)
    tokens = random_tokens(150, seed=11)
    llm = tiny_llama(path, n_ctx, group_size, window, n_batch=64, n_ubatch=32)
    llm.eval(tokens)
    rule = ReferenceModel.from_gguf(path, dtype=torch.float64, n_ctx=llm.n_ctx())
    mode = rule.attention_mode("self_extend" if group_size > 1 else "vanilla", group_size, window)
    assert rule.global_rope(mode) is {"short": rule.rope, "long": rule.rope_long}[factors]
    other = {"short": "long", "long": "short"}[factors]
    error = max_error(llm, with_factors(rule, factors), tokens, group_size, window)
    print(f"phi3 factors original={original_context} G={group_size} W={window} n_ctx={n_ctx} {factors}: "
          f"max |diff| {error:.2e}")
    assert error <= TOLERANCE
    assert max_error(llm, with_factors(rule, other), tokens, group_size, window) > MATTERS


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory, make_tiny_gguf):
    """(path, reference at n_ctx 256) of a one-layer tiny Phi-3: its cached K and V do not depend on the attention
    that produced them, so a cache filled under one G continues exactly as the reference's under another."""
    path = make_tiny_gguf.write_tiny_phi3(tmp_path_factory.mktemp("phi3") / "one-layer.gguf", n_layer=1)
    return path, ReferenceModel.from_gguf(path, dtype=torch.float64, n_ctx=N_CTX)


def test_switch_that_keeps_the_factors_re_rotates_the_cache(one_layer):
    """G = 1 -> 3 -> 5 on a live cache, the long factors throughout: the K-shift that moves the cached keys is a
    pure rotation (it does not scale them by the attention factor again)."""
    path, reference = one_layer
    tokens = random_tokens(160, seed=9)
    llm = tiny_llama(path, 160, 1, None, n_batch=64, n_ubatch=64)
    llm.eval(tokens[:100])
    llm.set_self_extend(*LONG[0])
    llm.eval(tokens[100:])
    error = max_error(llm, reference, tokens, *LONG[0], first=100)
    llm.set_self_extend(*LONG[1])
    llm.n_tokens = 120
    llm.eval(tokens[120:])
    error = max(error, max_error(llm, reference, tokens, *LONG[1], first=120))
    print(f"phi3 live switches G=1 -> {LONG[0]} -> {LONG[1]}: max |diff| {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("before,after", [((1, None), SHORT[0]), (SHORT[0], LONG[0])])
def test_switch_that_changes_the_factors_is_refused_until_the_cache_is_cleared(one_layer, before, after):
    """The cached keys were rotated with one set of factors, and a K-shift cannot give them the other: the
    switch is refused (status -3, a ValueError that says to clear the cache) and changes nothing; once the
    cache is cleared it is made."""
    path, reference = one_layer
    tokens = random_tokens(160, seed=10)
    llm = tiny_llama(path, 160, *before, n_batch=64, n_ubatch=64)
    llm.eval(tokens[:100])
    with pytest.raises(ValueError, match="LongRoPE factors.*clear the cache first"):
        llm.set_self_extend(*after)
    assert llm._lib.llama_set_self_extend(llm._ctx.ctx, *after) == -3
    assert (llm.grp_attn_n, llm.grp_attn_w) == (before[0], before[1] or 0)
    llm.eval(tokens[100:])
    assert max_error(llm, reference, tokens, *before) <= TOLERANCE

    llm._ctx.kv_cache_clear()  # llama_memory_clear
    llm.reset()
    llm.set_self_extend(*after)
    llm.eval(tokens)
    error = max_error(llm, reference, tokens, *after)
    print(f"phi3 switch {before} -> {after} after clearing: max |diff| {error:.2e}")
    assert error <= TOLERANCE
