"""Helpers of the parity tests: the patched llama.cpp (selfextend_gguf.Llama) against the torch
reference on tiny random models (tiny_gguf), at every position."""
from __future__ import annotations

import os

import numpy as np

from .. import Llama, SelfExtend, max_context
from .._native import load_llama_cpp

llama_cpp = load_llama_cpp()

# max |logit difference| for F32 weights and an F32 KV cache on the CPU
CPU_TOLERANCE = 1e-3
# the parity tests' bar: the CPU's, or, on a device whose own error with Self-Extend off is larger, a bar
# fitted to it (tests/test_vulkan.py sets it)
TOLERANCE = float(os.environ.get("SELFEXTEND_TEST_TOLERANCE", repr(CPU_TOLERANCE)))
# the per-case bar: Self-Extend's error in a case may be at most NOISE_RATIO times the error of the same
# case with Self-Extend off (same tokens, cache types, schedule and device), plus the CPU's bar
NOISE_RATIO = 2.0
# a difference no rounding explains, on any device: the tests that check a setting changes the logits use it
MATTERS = 0.1
F32 = llama_cpp.GGML_TYPE_F32


def noise_bar(off_error: float) -> float:
    """The most Self-Extend's error may be in a case whose error with Self-Extend off is off_error."""
    return NOISE_RATIO * off_error + CPU_TOLERANCE


def random_tokens(n, seed=0, n_vocab=320) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, size=n).tolist()


def n_gpu_layers_for_tests() -> int:
    """The layers the tests put on the GPU: SELFEXTEND_TEST_N_GPU_LAYERS (-1: all; scripts/gpu_check.sh, the
    Vulkan check and the limited device of tests/native_build.py set it), else none."""
    return int(os.environ.get("SELFEXTEND_TEST_N_GPU_LAYERS", "0"))


def tiny_llama(path, n_ctx, group_size, window, type_k=F32, type_v=F32, **kwargs) -> Llama:
    """A Llama that keeps every position's logits, with an F32 KV cache and without flash attention
    (Llama's default is on) unless told; every layer on the GPU where SELFEXTEND_TEST_N_GPU_LAYERS=-1
    (scripts/gpu_check.sh runs the parity tests so)."""
    kwargs.setdefault("flash_attn", False)
    kwargs.setdefault("n_gpu_layers", n_gpu_layers_for_tests())
    return Llama(str(path), n_ctx=n_ctx, grp_attn_n=group_size, grp_attn_w=window, logits_all=True,
                 type_k=type_k, type_v=type_v, n_threads=2, n_threads_batch=2, verbose=False, seed=0, **kwargs)


def prefill_then_decode(llm, tokens, n_single) -> np.ndarray:
    """[n, n_vocab] logits of llm (a llama_cpp.Llama keeping every position's) over tokens: the prompt
    but its last n_single tokens in llm's ubatches, then those one llama_decode each."""
    llm.eval(tokens[:len(tokens) - n_single])
    for token in tokens[len(tokens) - n_single:]:
        llm.eval([token])
    return np.asarray(llm.scores[:len(tokens)])


def reference_logits(reference, tokens, group_size, window) -> np.ndarray:
    """[n, n_vocab] logits of the torch reference (exact Self-Extend, or vanilla for G = 1)."""
    import torch

    mode = "self_extend" if group_size > 1 else "vanilla"
    with torch.no_grad():
        return reference.forward(torch.tensor(tokens), mode=mode, group_size=group_size, window=window).numpy()


def greedy_tokens(llm, prompt_tokens, n) -> list[int]:
    """Up to n greedy tokens of llm (a llama_cpp.Llama) after prompt_tokens, an end-of-generation
    token included, last, where there is one: as llama-server's "tokens" list them (it detokenizes
    to nothing, as llama.cpp's programs print it)."""
    out = []
    for token in llm.generate(prompt_tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if token == llm._token_eos or len(out) == n:
            break
    return out


def fitting_length(group_size, window, n_ctx_train=64, cap=300) -> int:
    """The longest context these settings reach on the tiny models, at most cap."""
    return min(cap, max_context(n_ctx_train, SelfExtend(group_size, window)))
