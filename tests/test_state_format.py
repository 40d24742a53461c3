"""Saved states between builds: a state whose keys are stored at Self-Extend's grouped positions is
written with a version of its own (llama.h: LLAMA_STATE_SEQ_VERSION_SELF_EXTEND), so that stock
llama.cpp refuses it at the file header instead of misreading the cache; with Self-Extend off the
file is stock llama.cpp's, both ways.

Each library runs in its own process (a process loads one libllama): plain llama-cpp-python with
LLAMA_CPP_LIB_PATH set, as in test_unpatched_identity.py.
"""
import os
import struct
import subprocess
import sys
from pathlib import Path

from selfextend_gguf._native import lib_dir
from native_build import unpatched_lib_dir

LLAMA_STATE_SEQ_MAGIC = 0x67677371           # 'ggsq'
LLAMA_STATE_SEQ_VERSION = 3                  # stock llama.cpp 0c1e570
LLAMA_STATE_SEQ_VERSION_SELF_EXTEND = 0x53450003
GROUP_SIZE, WINDOW, N_TOKENS = 4, 16, 200    # the tiny model is trained on 64 tokens

# argv: model, action ("save" or "load"), state file, group size. Prints the result of the call.
STATE_SCRIPT = """
import ctypes, sys
import numpy as np
import llama_cpp
path, action, state_file, group_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=256, n_batch=64, n_ubatch=64, n_threads=2, verbose=action == "load")
if group_size > 1:
    lib = llama_cpp.llama_cpp._lib
    lib.llama_set_self_extend.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    assert lib.llama_set_self_extend(llm.ctx, group_size, {window}) == 0
tokens = np.random.default_rng(0).integers(0, llm.n_vocab(), size={n_tokens}).tolist()
array = (llama_cpp.llama_token * len(tokens))(*tokens)
if action == "save":
    llm.eval(tokens)
    print(llama_cpp.llama_state_seq_save_file(llm.ctx, state_file.encode(), 0, array, len(tokens)))
else:
    n_read = ctypes.c_size_t(0)
    print(llama_cpp.llama_state_seq_load_file(llm.ctx, state_file.encode(), 0, array, len(tokens),
                                              ctypes.byref(n_read)))
""".format(window=WINDOW, n_tokens=N_TOKENS)


def run_state(library_dir: Path, model: Path, action: str, state_file: Path, group_size: int):
    """(printed result of the save or load call, stderr) in a child bound to library_dir."""
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(library_dir))
    done = subprocess.run([sys.executable, "-c", STATE_SCRIPT, str(model), action, str(state_file),
                           str(group_size)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1]), done.stderr


def header(state_file: Path):
    magic, version = struct.unpack("<II", state_file.read_bytes()[:8])
    return magic, version


def test_a_self_extend_state_is_refused_by_stock_llama_cpp_at_the_header(tiny_f16_gguf, tmp_path):
    state_file = tmp_path / "grouped.bin"
    written, _ = run_state(lib_dir(), tiny_f16_gguf, "save", state_file, GROUP_SIZE)
    assert written == state_file.stat().st_size > 0
    assert header(state_file) == (LLAMA_STATE_SEQ_MAGIC, LLAMA_STATE_SEQ_VERSION_SELF_EXTEND)

    read, log = run_state(unpatched_lib_dir(), tiny_f16_gguf, "load", state_file, 1)
    assert read == 0
    assert "unknown (magic, version) for sequence state file: 67677371, 53450003" in log
    assert "n_stream mismatch" not in log

    # the patched build reads it back, with Self-Extend on or off (then it re-rotates the keys)
    for group_size in (GROUP_SIZE, 1):
        read, log = run_state(lib_dir(), tiny_f16_gguf, "load", state_file, group_size)
        assert read == state_file.stat().st_size, log[-2000:]


def test_with_self_extend_off_the_state_file_is_stock_llama_cpp_s_both_ways(tiny_f16_gguf, tmp_path):
    patched_file, stock_file = tmp_path / "patched.bin", tmp_path / "stock.bin"
    run_state(lib_dir(), tiny_f16_gguf, "save", patched_file, 1)
    run_state(unpatched_lib_dir(), tiny_f16_gguf, "save", stock_file, 1)
    assert header(patched_file) == (LLAMA_STATE_SEQ_MAGIC, LLAMA_STATE_SEQ_VERSION)
    assert patched_file.read_bytes() == stock_file.read_bytes()

    read, log = run_state(unpatched_lib_dir(), tiny_f16_gguf, "load", patched_file, 1)
    assert read == patched_file.stat().st_size, log[-2000:]
    read, log = run_state(lib_dir(), tiny_f16_gguf, "load", stock_file, GROUP_SIZE)
    assert read == stock_file.stat().st_size, log[-2000:]
