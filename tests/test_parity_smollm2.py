"""The embedded SmolLM2 (Q4_1) against the torch reference on its dequantized weights.

llama.cpp quantizes activations for Q4_1 matrix products, so its logits differ from a float64
forward even with Self-Extend off. That difference, measured here with Self-Extend off, is the
noise floor: with Self-Extend on, the mean KL divergence may be at most twice the floor and the
top-1 agreement at most 1 point below it.
"""
import os

import numpy as np
import pytest
import torch

from selfextend_gguf import Llama

N_TOKENS = 1024
GROUP_SIZE, WINDOW = 4, 128


def sample_text(n_sentences=200):
    """Plain English prose with numbers that change, so every window looks different."""
    subjects = ["The river", "A merchant", "The old clock", "My neighbour", "The committee", "A small boat"]
    verbs = ["crossed", "counted", "painted", "measured", "described", "remembered"]
    objects = ["the northern bridge", "seven silver coins", "a quiet harbour", "the last train",
               "an unfinished letter", "the market square"]
    rng = np.random.default_rng(0)
    sentences = [f"{subjects[rng.integers(6)]} {verbs[rng.integers(6)]} {objects[rng.integers(6)]} "
                 f"on day {i} at {rng.integers(1, 12)} o'clock." for i in range(n_sentences)]
    return " ".join(sentences)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(ours, reference):
    """(mean KL(reference || ours), top-1 agreement) over positions."""
    log_p, log_q = log_softmax(reference), log_softmax(ours)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
    top1 = (ours.argmax(-1) == reference.argmax(-1)).mean()
    return float(kl), float(top1)


@pytest.fixture(scope="module")
def smollm2_tokens(smollm2_path):
    llm = Llama(str(smollm2_path), n_ctx=N_TOKENS, vocab_only=True, verbose=False)
    tokens = llm.tokenize(sample_text().encode(), add_bos=False)[:N_TOKENS]
    assert len(tokens) == N_TOKENS
    return tokens


def llama_cpp_logits(path, tokens, group_size, window):
    llm = Llama(str(path), n_ctx=N_TOKENS, n_batch=256, n_ubatch=256, logits_all=True, n_threads=2,
                grp_attn_n=group_size, grp_attn_w=window, verbose=False,
                n_gpu_layers=int(os.environ.get("SELFEXTEND_TEST_N_GPU_LAYERS", "0")))
    llm.eval(tokens)
    return np.asarray(llm.scores[:len(tokens)], dtype=np.float64)


def test_self_extend_is_within_the_quantization_noise_floor(smollm2_path, smollm2_reference, smollm2_tokens):
    tokens = torch.tensor(smollm2_tokens)
    with torch.no_grad():
        reference_off = smollm2_reference.forward(tokens).numpy()
        reference_on = smollm2_reference.forward(tokens, mode="self_extend", group_size=GROUP_SIZE,
                                                 window=WINDOW).numpy()
    kl_off, top1_off = agreement(llama_cpp_logits(smollm2_path, smollm2_tokens, 1, None), reference_off)
    kl_on, top1_on = agreement(llama_cpp_logits(smollm2_path, smollm2_tokens, GROUP_SIZE, WINDOW), reference_on)
    print(f"SmolLM2 {N_TOKENS} tokens: off KL {kl_off:.5f} top-1 {top1_off:.4f}; "
          f"G={GROUP_SIZE} W={WINDOW} KL {kl_on:.5f} top-1 {top1_on:.4f}")
    assert kl_on <= 2 * kl_off
    assert top1_on >= top1_off - 0.01
    # Self-Extend changes the output well beyond the noise floor, so a library that ignored it would fail
    assert agreement(reference_on, reference_off)[0] > 4 * kl_off
