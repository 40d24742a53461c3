"""Self-Extend on ggml's RPC backend: the model's layers and KV cache on a ggml-rpc-server device.

The patched llama.cpp is built a second time, with -DGGML_RPC=ON -DSELFEXTEND_BUILD_TOOLS=ON, into
build/rpc (targets llama and ggml-rpc-server only; tests/native_build.py). The first run compiles it
(COLD_BUILD_NOTE); later runs only ask ninja, and rebuild what a changed patch touches.

A ggml-rpc-server (the pin's name for tools/rpc's binary) listens on 127.0.0.1 and exposes its CPU
as device RPC0. A child process loads that build's libraries (SELFEXTEND_GGUF_LIB_PATH: a process
loads one libllama) and greedy-generates from a prompt past the 64-token trained context with
Self-Extend G=4 W=16, first on the local CPU (n_gpu_layers=0), then with every layer offloaded to
the RPC device (n_gpu_layers=99). llama-cpp-python 0.3.36's Llama has no rpc_servers argument any
more; the server is added as llama.cpp's --rpc does it: ggml_backend_reg_by_name("RPC"), its
"ggml_backend_rpc_add_server" proc address, and ggml_backend_register(the returned reg), after
which llama.cpp's default device list puts the RPC device first.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from native_build import ROOT, build_llama_cpp, have_build_tools
from selfextend_gguf.testing.parity import TOLERANCE, random_tokens, reference_logits

RPC_BUILD = ROOT / "build" / "rpc"
GROUP_SIZE, WINDOW = 4, 16
N_PROMPT, N_GENERATE = 150, 40

# runs in a child process with SELFEXTEND_GGUF_LIB_PATH=<RPC build>/bin
CHILD = r"""
import ctypes, json, sys
root, model, endpoint, out, prompt, n_generate, group_size, window = sys.argv[1:]
sys.path.insert(0, root)
import numpy as np
from selfextend_gguf import Llama
from selfextend_gguf._native import lib_dir, load_llama_cpp
llama_cpp = load_llama_cpp()
prompt, n_generate = json.loads(prompt), int(n_generate)

def greedy(n_gpu_layers, verbose):
    llm = Llama(model, n_ctx=len(prompt) + n_generate + 8, grp_attn_n=int(group_size), grp_attn_w=int(window),
                n_gpu_layers=n_gpu_layers, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32, n_batch=64, n_ubatch=32, n_threads=2, n_threads_batch=2,
                seed=0, verbose=verbose)
    assert (llm.grp_attn_n, llm.grp_attn_w) == (int(group_size), int(window))
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0):
        tokens.append(token)
        if len(tokens) == n_generate:
            break
    scores = np.asarray(llm.scores[:llm.n_tokens]).copy()
    llm.close()
    return tokens, scores

cpu_tokens, cpu_scores = greedy(0, False)  # before the RPC device exists

ggml = ctypes.CDLL(str(lib_dir() / "libggml.so"))  # already loaded by libllama: the same instance
ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
ggml.ggml_backend_register.restype = None
ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
rpc = ggml.ggml_backend_reg_by_name(b"RPC")
assert rpc, "this libggml has no RPC backend"
add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
    ggml.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server"))
server = add_server(endpoint.encode())
assert server, f"no device at {endpoint}"
ggml.ggml_backend_register(server)
devices = [ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)).decode()
           for i in range(ggml.ggml_backend_dev_count())]

rpc_tokens, rpc_scores = greedy(99, True)
np.save(f"{out}/cpu.npy", cpu_scores)
np.save(f"{out}/rpc.npy", rpc_scores)
print(json.dumps({"lib": str(lib_dir()), "devices": devices, "cpu": cpu_tokens, "rpc": rpc_tokens}))
"""


@pytest.fixture(scope="module")
def rpc_bin_dir():
    if not have_build_tools():
        pytest.skip("cmake and ninja are needed to build llama.cpp with GGML_RPC=ON")
    return build_llama_cpp(RPC_BUILD, ["-DGGML_RPC=ON", "-DSELFEXTEND_BUILD_TOOLS=ON"],
                           ["llama", "ggml-rpc-server"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_server(rpc_bin_dir, tmp_path):
    """(endpoint, path of the server's log): a ggml-rpc-server on 127.0.0.1, stopped afterwards."""
    port = free_port()
    log = tmp_path / "rpc-server.log"
    with open(log, "w") as out:
        # GGML_RPC_DEBUG: the server logs every command it serves (set_tensor, graph_compute, ...)
        server = subprocess.Popen([str(rpc_bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                   "-t", "2"], stdout=out, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, GGML_RPC_DEBUG="1"))
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens (a connection that sends nothing is dropped by the server)
            assert server.poll() is None, f"ggml-rpc-server exited: {log.read_text()[-2000:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"ggml-rpc-server does not listen: {log.read_text()[-2000:]}"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", log
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_self_extend_on_rpc_device_matches_cpu(rpc_bin_dir, rpc_server, tiny_f32_gguf, tiny_reference, tmp_path):
    endpoint, server_log = rpc_server
    prompt = random_tokens(N_PROMPT, seed=12)
    env = dict(os.environ, SELFEXTEND_GGUF_LIB_PATH=str(rpc_bin_dir))
    env.pop("LLAMA_CPP_LIB_PATH", None)
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(tiny_f32_gguf), endpoint, str(tmp_path),
                            json.dumps(prompt), str(N_GENERATE), str(GROUP_SIZE), str(WINDOW)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["lib"] == str(rpc_bin_dir.resolve())
    assert any(name.startswith("RPC") for name in result["devices"]), result["devices"]

    # the weights and the KV cache were on the RPC device, and the server computed graphs
    log = child.stderr
    name = rf"RPC\d+\[{re.escape(endpoint)}\]"
    assert re.search(rf"{name}\s+model buffer size", log), log[-4000:]
    assert re.search(rf"{name}\s+KV buffer size", log), log[-4000:]
    assert re.search(r"offloaded (\d+)/\1 layers to GPU", log), log[-4000:]
    served = server_log.read_text()  # one graph per llama_decode ("recompute": the graph it already has)
    n_graphs = len(re.findall(r"\[graph_(?:re)?compute\]", served))
    assert n_graphs >= N_GENERATE, served[-2000:]

    # same tokens and logits as on the local CPU, and both exact against the torch reference
    assert len(result["rpc"]) == N_GENERATE
    assert result["rpc"] == result["cpu"]
    cpu, rpc = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "rpc.npy")
    assert rpc.shape == cpu.shape == (N_PROMPT + N_GENERATE - 1, 320)
    expected = reference_logits(tiny_reference, prompt + result["rpc"][:-1], GROUP_SIZE, WINDOW)
    vs_cpu, vs_reference = np.abs(rpc - cpu).max(), np.abs(rpc - expected).max()
    print(f"RPC vs CPU max |diff| {vs_cpu:.2e}, vs reference {vs_reference:.2e}; "
          f"{n_graphs} graphs computed by the server")
    assert vs_cpu <= TOLERANCE
    assert vs_reference <= TOLERANCE
