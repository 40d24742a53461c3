"""The graph llama.cpp reserves its compute buffers for is the worst case that Self-Extend runs: no
ubatch grows them later. A growth reallocates the buffers between two graphs; on a backend that runs
asynchronously, the graph before may still be reading the freed ones (on Vulkan's lavapipe it
corrupted the heap: tests/test_vulkan.py, docs/backends.md). llama.cpp reports a growth when the
context is freed: "compute buffer size of X MiB, does not match expectation of Y MiB".

The flows below plan many moves of cells between the grouped and the neighbor rotation in one
ubatch: a prefill that slides the window, a rewind that brings grouped cells back into it, single
tokens after that, on every cache type and both attention paths."""
import subprocess
import sys

import pytest

from native_build import ROOT

# in a child: llama.cpp logs the mismatch to stderr when the context is freed
CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from selfextend_gguf.testing.parity import llama_cpp, random_tokens, tiny_llama
path, flash_attn, type_k = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
llm = tiny_llama(path, 208, 4, 16, n_batch=64, n_ubatch=64, flash_attn=flash_attn, type_k=type_k,
                 type_v=llama_cpp.GGML_TYPE_F32 if type_k == llama_cpp.GGML_TYPE_F32 else llama_cpp.GGML_TYPE_F16)
llm.eval(random_tokens(200, seed=1))
llm.n_tokens = 90  # the next eval removes cells 90.. (seq_rm): the window's grouped cells move back
llm.eval(random_tokens(100, seed=2))
for token in random_tokens(8, seed=3):
    llm.eval([token])
llm.close()
print("done")
"""


@pytest.fixture(scope="module")
def tiny_hd64_gguf(tiny_gguf_dir, make_tiny_gguf):
    """The tiny recipe with heads of 64, so that a Q8_0 block (32) divides them (test_parity_kv_types.py)."""
    return make_tiny_gguf.write_tiny_llama(tiny_gguf_dir / "tiny-f32-hd64-reserve.gguf", weight_type="f32",
                                           n_embd=128, n_head=2, n_head_kv=1)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
@pytest.mark.parametrize("type_k", ["f32", "f16", "q8_0"])
def test_no_ubatch_grows_the_compute_buffers(tiny_hd64_gguf, flash_attn, type_k):
    type_k = {"f32": 0, "f16": 1, "q8_0": 8}[type_k]  # GGML_TYPE_*
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(tiny_hd64_gguf), str(int(flash_attn)),
                           str(type_k)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]
    assert "does not match expectation" not in done.stderr, \
        [line for line in done.stderr.splitlines() if "does not match" in line]


# the reported case: SmolLM2 with every position's logits (so the 96 MiB logits dominate the buffer and
# the allocator's layout decides), a completion of 80 tokens, then a prompt that shares its prefix
SMOLLM2_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from selfextend_gguf import Llama
llm = Llama(sys.argv[2], n_ctx=2048, grp_attn_n=4, grp_attn_w=64, logits_all=True, flash_attn=sys.argv[3] == "1",
            n_threads=2, verbose=True, seed=0)
doc = " ".join(f"line {i} of the story goes on." for i in range(100))
llm.create_completion(doc + " Question one:", max_tokens=80, temperature=0)
llm.create_completion(doc + " Question two, with more words:" + " and more" * 100, max_tokens=8, temperature=0)
llm.close()
print("done")
"""


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
def test_reused_prompt_does_not_grow_the_compute_buffers(smollm2_path, flash_attn):
    """The first prompt (all its cells still in the window: no grouped block, no moves) is reserved as a
    shape of its own; before, it grew the buffer from 98.25 to 99.38 MiB on both attention paths."""
    done = subprocess.run([sys.executable, "-c", SMOLLM2_CHILD, str(ROOT), str(smollm2_path), str(int(flash_attn))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]
    assert "matches expectation" in done.stderr  # the check ran
    assert "does not match expectation" not in done.stderr, \
        [line for line in done.stderr.splitlines() if "does not match" in line]
