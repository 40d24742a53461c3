"""Self-Extend on Gemma 2: attention logit soft-capping (every score s becomes c tanh(s / c)) on the
grouped and the neighbor scores alike, and the final logit soft-capping. The tiny fixture
(conftest.py, write_tiny_gemma2) caps its scores at 2, where they are changed by it. Its prefill
(swa_full on and off), decode and G = 1 cases without flash attention are in
test_parity_architectures.py, at the usual bar (max |logit difference| <= 1e-3).

With flash attention, llama.cpp's own CPU kernel is further from the float64 reference on the tiny
Gemma models than that bar (about 5e-3 at G = 1, Gemma 3 as well as Gemma 2, measured), so the flash
cases are held to plain llama.cpp's own flash error on the same tokens: Self-Extend may not add to it.
They run on each of the flash attention's device paths (tests/native_build.py): one flash attention
per block (ggml_flash_attn_ext_lse, the CPU's), and the doubled head size of devices without it.
"""
import numpy as np
import pytest
import torch

from native_build import main_lib_dir, run_with_library
from selfextend_gguf.reference import ReferenceModel
from selfextend_gguf.testing.parity import MATTERS, TOLERANCE, fitting_length, random_tokens, reference_logits, tiny_llama


def flash_errors(path, group_size, window, swa_full):
    """[max |diff| of Self-Extend with flash attention, of plain llama.cpp with flash attention], each
    against the float64 reference, on the same tokens (JSON values: run_with_library calls it too)."""
    reference = ReferenceModel.from_gguf(path, dtype=torch.float64, ffn_gelu="ggml_cpu")
    n = fitting_length(group_size, window)
    tokens = random_tokens(n, seed=group_size)
    errors = []
    for g, w in ((group_size, window), (1, None)):
        llm = tiny_llama(path, n, g, w, n_batch=64, n_ubatch=32, flash_attn=True, swa_full=swa_full)
        llm.eval(tokens)
        errors.append(float(np.abs(np.asarray(llm.scores[:n]) - reference_logits(reference, tokens, g, w)).max()))
    return errors


def check_flash(errors, group_size, window, swa_full):
    extended, plain = errors
    print(f"gemma2 flash G={group_size} W={window} swa_full={swa_full}: Self-Extend {extended:.2e}, plain {plain:.2e}")
    assert extended <= max(2 * plain, TOLERANCE), (extended, plain)


@pytest.mark.parametrize("group_size,window,swa_full", [(3, 10, True), (5, 11, False)])
def test_flash_attention_soft_caps_every_block(tiny_gemma2_gguf, group_size, window, swa_full):
    check_flash(flash_errors(tiny_gemma2_gguf, group_size, window, swa_full), group_size, window, swa_full)


@pytest.mark.parametrize("which", ["no_flash_lse", "fallbacks"])
def test_flash_attention_fallbacks_soft_cap_every_block(tiny_gemma2_gguf, which):
    """The doubled head size (devices without ggml_flash_attn_ext_lse) and, on "fallbacks", every other
    path of devices without Self-Extend's faster operations (native_build.LIMITED_DEVICES)."""
    errors = run_with_library(main_lib_dir(), "test_parity_gemma2", "flash_errors",
                              str(tiny_gemma2_gguf), 3, 10, False, limited_device=which)
    check_flash(errors, 3, 10, False)


def test_soft_capping_matters(tiny_gemma2_gguf):
    """The fixture's cap changes the reference's logits, so the parity tests see a missing cap."""
    reference = ReferenceModel.from_gguf(tiny_gemma2_gguf, dtype=torch.float64, ffn_gelu="ggml_cpu")
    tokens = random_tokens(120, seed=3)
    capped = reference_logits(reference, tokens, 3, 10)
    reference.hparams = type(reference.hparams)(**{**reference.hparams.__dict__, "attn_logit_softcapping": 0.0})
    uncapped = reference_logits(reference, tokens, 3, 10)
    assert reference.hparams.swa_layers == (True, False, True, False)
    assert np.abs(capped - uncapped).max() > MATTERS
