"""With Self-Extend off (group size 1) the patched library computes exactly what unpatched
llama.cpp computes: same logits, bit for bit.

The unpatched library is built once from the same pinned source without patches/ (CMake option
SELFEXTEND_APPLY_PATCHES=OFF) into build/unpatched (native_build.unpatched_lib_dir); a first run takes a few minutes. Each library
runs in its own process, since a process loads one libllama.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from native_build import unpatched_lib_dir
from selfextend_gguf._native import lib_dir

# runs in a child process with LLAMA_CPP_LIB_PATH set: plain llama-cpp-python, no selfextend_gguf
EVAL_SCRIPT = """
import json, sys
import numpy as np
import llama_cpp
path, n_tokens, type_k, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(path, n_ctx=512, n_batch=128, n_ubatch=64, logits_all=True, n_threads=2,
                      n_threads_batch=2, type_k=type_k, verbose=False)
tokens = np.random.default_rng(0).integers(0, llm.n_vocab(), size=n_tokens).tolist()
llm.eval(tokens[:n_tokens - 16])
for token in tokens[n_tokens - 16:]:
    llm.eval([token])
np.save(out, np.asarray(llm.scores[:n_tokens]))
"""


def logits_with(library_dir: Path, model: Path, n_tokens: int, type_k: int, out: Path) -> np.ndarray:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(library_dir))
    subprocess.run([sys.executable, "-c", EVAL_SCRIPT, str(model), str(n_tokens), str(type_k), str(out)],
                   check=True, env=env)
    return np.load(out)


@pytest.mark.parametrize("model,n_tokens,type_k", [("tiny_f16", 300, 1), ("tiny_q8_0", 300, 8), ("smollm2", 200, 1)])
def test_group_size_one_is_bit_identical_to_unpatched(model, n_tokens, type_k, tiny_gguf_paths, smollm2_path, tmp_path):
    path = smollm2_path if model == "smollm2" else tiny_gguf_paths[model.removeprefix("tiny_")]
    unpatched = logits_with(unpatched_lib_dir(), path, n_tokens, type_k, tmp_path / "unpatched.npy")
    patched = logits_with(lib_dir(), path, n_tokens, type_k, tmp_path / "patched.npy")
    assert patched.shape == (n_tokens, unpatched.shape[1])
    assert np.array_equal(patched, unpatched)
