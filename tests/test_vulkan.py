"""Self-Extend on a GPU backend without a GPU: ggml-vulkan on Mesa's software Vulkan device (lavapipe,
the "llvmpipe" device), every layer offloaded. Not part of the default suite (issue 20 is blocked: see
docs/backends.md, "Vulkan (lavapipe)"); scripts/vulkan_check.sh installs what it needs and runs it:

    bash scripts/vulkan_check.sh          # = python -m pytest -q tests/vulkan_check.py

The patched llama.cpp is built once more with -DGGML_VULKAN=ON into build/vulkan (target llama). That
needs Debian's mesa-vulkan-drivers, libvulkan-dev, glslc and spirv-headers; patch 0011 lets
ggml-vulkan build against Debian 12's Vulkan headers. ggml-vulkan skips CPU-type devices unless told:
GGML_VK_VISIBLE_DEVICES=0 selects llvmpipe.

- the op audit: every node that Self-Extend adds to the real graph is accepted by the Vulkan device's
  supports_op and computed on it; Self-Extend moves no node to the CPU; Vulkan has no
  ggml_flash_attn_ext_lse, so the patch's probes take the documented path (one flash attention of the
  doubled head size, V at its own head size where the device takes two head sizes, out_prod for
  single-token steps where it has out_prod), and the test reports which one ran;
- parity: the existing parity tests (llama, qwen2, gemma3, Gemma 2, the cache types; prefill in
  ubatches smaller than the prompt, token-by-token decode, rewind, two sequences, flash attention on
  and off, F16 and q8_0 K caches) run again in a child pytest bound to this build, with every layer
  on the Vulkan device (SELFEXTEND_TEST_N_GPU_LAYERS=-1, read by testing.parity.tiny_llama);
- G = 1 on Vulkan against the unpatched Vulkan build (build/vulkan-unpatched: patch 0011 only).
"""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from native_build import ROOT, build_llama_cpp, have_build_tools, library_env, run_with_library

VULKAN_BUILD = ROOT / "build" / "vulkan"
VULKAN_UNPATCHED_BUILD = ROOT / "build" / "vulkan-unpatched"
PACKAGES = "mesa-vulkan-drivers libvulkan-dev glslc spirv-headers"
# what the build and the device need, by what provides it
NEEDED = {
    "glslc": lambda: shutil.which("glslc"),
    "libvulkan-dev": lambda: Path("/usr/include/vulkan/vulkan.hpp").exists(),
    "spirv-headers": lambda: Path("/usr/include/spirv/unified1/spirv.hpp").exists(),
    "mesa-vulkan-drivers": lambda: list(Path("/usr/share/vulkan/icd.d").glob("lvp_icd*.json")),
}
# the parity tests that run again on the device; the excluded ones run builds of other paths (fallbacks)
# or check refusals, which have nothing to do with the device
PARITY_FILES = ["tests/test_parity.py", "tests/test_parity_architectures.py", "tests/test_parity_kv_types.py",
                "tests/test_parity_gemma2.py", "tests/test_parity_gemma3.py"]
PARITY_DESELECT = "not no_flash_lse and not fallbacks and not transposed and not refused and not yarn"


@pytest.fixture(scope="module")
def vulkan_bin_dir():
    missing = [package for package, present in NEEDED.items() if not present()]
    if not have_build_tools():
        missing.append("cmake and ninja")
    assert not missing, f"the Vulkan build needs {', '.join(missing)}: apt-get install {PACKAGES}"
    os.environ["GGML_VK_VISIBLE_DEVICES"] = "0"  # for run_with_library's children too
    return build_llama_cpp(VULKAN_BUILD, ["-DGGML_VULKAN=ON", "-DSELFEXTEND_BUILD_TOOLS=OFF"], ["llama"])


# ---- runs in a child process bound to a Vulkan build (run_with_library) ----

def vulkan_devices() -> list:
    """[(name, description)] of ggml's devices."""
    import ctypes
    from selfextend_gguf._native import lib_dir, load_llama_cpp
    load_llama_cpp()  # loads the backends
    ggml = ctypes.CDLL(str(lib_dir() / "libggml.so"))
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for function in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
        function.restype, function.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    return [(ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)).decode(),
             ggml.ggml_backend_dev_description(ggml.ggml_backend_dev_get(i)).decode())
            for i in range(ggml.ggml_backend_dev_count())]


def offloaded_graph(path, group_size, window, flash_attn) -> dict:
    """The nodes of a prefill-and-decode graph with every layer on the Vulkan device (see
    test_backend_ops.graph_ops): ops, output widths of the attention nodes, and per (op, name) the
    buffers it was computed into and whether the device supports it."""
    from test_backend_ops import graph_ops
    nodes, widths = {}, {}
    ops = graph_ops(path, group_size, window, 192, flash_attn=flash_attn, widths=widths, n_gpu_layers=-1,
                    nodes=nodes)
    return {"ops": sorted(ops), "widths": {n: sorted(w) for n, w in widths.items() if "kqv" in n},
            "nodes": [[op, name, sorted(node["buffers"]), node["supported"]] for (op, name), node in nodes.items()]}


def vanilla_logits(path, n_tokens) -> list:
    """Logits of plain llama-cpp-python (no Self-Extend call, so an unpatched build runs it too) with every
    layer on the device: prefill ubatches, then 16 single-token steps."""
    os.environ["LLAMA_CPP_LIB_PATH"] = os.environ["SELFEXTEND_GGUF_LIB_PATH"]
    import llama_cpp
    from selfextend_gguf.testing.parity import random_tokens
    tokens = random_tokens(n_tokens, seed=3)
    llm = llama_cpp.Llama(path, n_ctx=n_tokens + 8, n_batch=64, n_ubatch=32, logits_all=True, n_gpu_layers=-1,
                          n_threads=2, n_threads_batch=2, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)
    llm.eval(tokens[:-16])
    for token in tokens[-16:]:
        llm.eval([token])
    return np.asarray(llm.scores[:n_tokens]).tolist()


# ---- the tests ----

def on_device(buffers) -> bool:
    return any(re.fullmatch(r"Vulkan\d+", b) for b in buffers)


def test_the_device_is_lavapipe(vulkan_bin_dir):
    devices = run_with_library(vulkan_bin_dir, "vulkan_check", "vulkan_devices")
    assert any(name.startswith("Vulkan") and "llvmpipe" in description for name, description in devices), devices


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
def test_self_extend_nodes_run_on_the_device(vulkan_bin_dir, tiny_f32_gguf, tiny_reference, flash_attn):
    """The op audit on the live device: Self-Extend adds no node that the Vulkan device refuses or that
    runs on the CPU, and the path its probes took is the documented one."""
    extended, vanilla = (run_with_library(vulkan_bin_dir, "vulkan_check", "offloaded_graph", str(tiny_f32_gguf),
                                          g, w, flash_attn) for g, w in ((4, 16), (1, None)))
    vanilla_nodes = {(op, name) for op, name, _, _ in vanilla["nodes"]}
    vanilla_cpu = {(op, name) for op, name, buffers, _ in vanilla["nodes"] if not on_device(buffers)}
    added = [(op, name, buffers, ok) for op, name, buffers, ok in extended["nodes"] if (op, name) not in vanilla_nodes]
    assert added, "Self-Extend on produced the vanilla graph"
    refused = [(op, name) for op, name, _, ok in added if not ok]
    on_cpu = [(op, name, buffers) for op, name, buffers, _ in extended["nodes"]
              if not on_device(buffers) and (op, name) not in vanilla_cpu]
    assert not refused, f"the Vulkan device refuses Self-Extend nodes: {refused}"
    assert not on_cpu, f"Self-Extend nodes computed off the device: {on_cpu}"
    assert any(on_device(buffers) for _, name, buffers, _ in added if "self_extend" in name)

    ops = set(extended["ops"])
    n_embd_head = tiny_reference.hparams.head_dim
    assert "FLASH_ATTN_EXT_LSE" not in ops  # a CPU-only op: the probes fall back
    if flash_attn:
        # the documented path of a device without ggml_flash_attn_ext_lse: one flash attention over the
        # doubled head size; which of V's layouts and decode reads it took, reported
        assert "FLASH_ATTN_EXT" in ops
        widths = extended["widths"]["kqv_self_extend_flash"]
        v_path = {(n_embd_head,): "V at its own head size", (2 * n_embd_head,): "V padded"}[tuple(widths)]
        decode_path = "out_prod" if "OUT_PROD" in ops else "transposed V"
        print(f"Vulkan, flash attention: Q and K at the doubled head size, {v_path}, decode steps: {decode_path}")
        assert "OUT_PROD" in ops or "TRANSPOSE" in ops
    else:
        assert "CONCAT" in ops and "FLASH_ATTN_EXT" not in ops
        print("Vulkan, no flash attention: score blocks joined by CONCAT, transposed V cache")


def test_parity_suite_on_the_device(vulkan_bin_dir, tmp_path):
    """The parity tests again, every layer on the llvmpipe device, at their CPU tolerances."""
    junit = tmp_path / "parity.xml"
    env = dict(library_env(vulkan_bin_dir), SELFEXTEND_TEST_N_GPU_LAYERS="-1")  # GGML_VK_VISIBLE_DEVICES: set by vulkan_bin_dir
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *PARITY_FILES, "-k", PARITY_DESELECT], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = ElementTree.parse(junit).getroot()
    suite = summary if summary.tag == "testsuite" else summary.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    print(f"parity on Vulkan (llvmpipe): {counts}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0
    assert counts["tests"] >= 60, counts  # the suite ran, not a handful of it


def test_group_size_one_matches_unpatched_vulkan(vulkan_bin_dir, tiny_f32_gguf):
    """G = 1 with every layer on the device: the same logits as the Vulkan build without the Self-Extend
    patches (only 0011, the header fix, which changes no computation)."""
    unpatched = build_llama_cpp(VULKAN_UNPATCHED_BUILD, ["-DGGML_VULKAN=ON", "-DSELFEXTEND_BUILD_TOOLS=OFF",
                                                         "-DSELFEXTEND_APPLY_PATCHES=OFF"], ["llama"])
    patched_logits = np.asarray(run_with_library(vulkan_bin_dir, "vulkan_check", "vanilla_logits",
                                                 str(tiny_f32_gguf), 160))
    unpatched_logits = np.asarray(run_with_library(unpatched, "vulkan_check", "vanilla_logits",
                                                   str(tiny_f32_gguf), 160))
    assert np.array_equal(patched_logits, unpatched_logits), np.abs(patched_logits - unpatched_logits).max()
