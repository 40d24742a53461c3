"""Self-Extend on a GPU backend without a GPU: ggml-vulkan on Mesa's software Vulkan device (lavapipe,
the "llvmpipe" device, Mesa 25 from bookworm-backports), every layer offloaded. Part of the suite
(`.ci/run` and the README's test command install the packages with scripts/install_vulkan_packages.sh);

    bash scripts/vulkan_check.sh          # the Vulkan check alone (installs the packages, then this file)

builds the patched llama.cpp once more with -DGGML_VULKAN=ON into build/vulkan (target llama); patch
0006 lets ggml-vulkan build against Debian 12's Vulkan headers. ggml-vulkan skips CPU-type devices
unless told: GGML_VK_VISIBLE_DEVICES=0 selects llvmpipe. A missing package or device fails (it
does not skip).

- the op audit: every node that Self-Extend adds to the real graph is accepted by the Vulkan device's
  supports_op and computed on it; Self-Extend moves no node to the CPU; without flash attention the
  score blocks are written in place (ggml_mul_mat_concat, patch 0015); with it, each block is a
  ggml_flash_attn_ext_lse at the model's own head size (patch 0016);
- llama.cpp's own op harness (test-backend-ops) on both new ops, Vulkan0 against the CPU;
- the device's own error: plain llama.cpp (Self-Extend off) against the float64 reference, every
  tiny architecture, flash attention off and on; lavapipe's is several times the CPU's;
- parity: the parity files (llama, qwen2, qwen3, gemma2, gemma3, phi2, phi3, SmolLM2; prefill in small
  ubatches, token-by-token decode, rewind, two sequences, states, regroup, flash attention on and off,
  every KV type, exact rewinds) run again in a child pytest bound to this build, every layer on the
  device. Case by case (test_parity_architectures.py's per-case test: every architecture, flash
  attention off and on; test_parity_kv_types.py: every KV type; test_parity_smollm2.py: SmolLM2's KL),
  Self-Extend's error is at most twice the same case's error with Self-Extend off on the device (plus
  the CPU's 1e-3); the figures go to build/vulkan-parity.txt. The other parity tests (rewinds, states,
  two sequences, regroup) compare against the reference with a bar fitted to the device: twice its
  largest error with Self-Extend off;
- G = 1 on Vulkan against the unpatched Vulkan build (build/vulkan-unpatched: patch 0006 only).
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
PACKAGES_HINT = "bash scripts/install_vulkan_packages.sh (as root)"
MESA_MAJOR_MIN = 25  # Mesa 22.3's lavapipe crashes in ggml-vulkan (docs/backends.md)
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
                "tests/test_parity_gemma2.py", "tests/test_parity_gemma3.py", "tests/test_parity_phi3.py",
                "tests/test_parity_qwen2.py", "tests/test_parity_smollm2.py", "tests/test_exact_rewind.py"]
# the tiny architectures whose error with Self-Extend off on the device sets the parity bar: (model, reference) fixtures
VANILLA_MODELS = [("tiny_f32_gguf", "tiny_reference"), ("tiny_qwen2_gguf", "tiny_qwen2_reference"),
                  ("tiny_qwen3_gguf", "tiny_qwen3_reference"), ("tiny_gemma2_gguf", "tiny_gemma2_cpu_gelu_reference"),
                  ("tiny_gemma3_gguf", "tiny_gemma3_cpu_gelu_reference"), ("tiny_phi2_gguf", "tiny_phi2_cpu_gelu_reference")]
PARITY_DESELECT = "not no_flash_lse and not fallbacks and not transposed and not refused and not yarn"


def mesa_major() -> int:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "mesa-vulkan-drivers"], capture_output=True, text=True)
    return int(done.stdout.split(".")[0]) if done.returncode == 0 and done.stdout[:1].isdigit() else 0


@pytest.fixture(scope="module")
def vulkan_bin_dir():
    missing = [package for package, present in NEEDED.items() if not present()]
    if not have_build_tools():
        missing.append("cmake and ninja")
    if not missing and mesa_major() < MESA_MAJOR_MIN:
        missing.append(f"mesa-vulkan-drivers {MESA_MAJOR_MIN} or newer (installed: {mesa_major() or 'none'})")
    if missing:
        pytest.fail(f"the Vulkan check needs {', '.join(missing)}: {PACKAGES_HINT}", pytrace=False)
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
    from selfextend_gguf.testing.parity import prefill_then_decode, random_tokens
    tokens = random_tokens(n_tokens, seed=3)
    llm = llama_cpp.Llama(path, n_ctx=n_tokens + 8, n_batch=64, n_ubatch=32, logits_all=True, n_gpu_layers=-1,
                          n_threads=2, n_threads_batch=2, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)
    return prefill_then_decode(llm, tokens, 16).tolist()


def device_vanilla_logits(path, n_tokens, flash_attn) -> list:
    """Logits with Self-Extend off (G = 1), every layer on the device: the parity tests' schedule of
    prefill ubatches of 32, then 16 single-token steps, F32 cache."""
    from selfextend_gguf.testing.parity import prefill_then_decode, random_tokens, tiny_llama
    tokens = random_tokens(n_tokens, seed=11)
    llm = tiny_llama(path, n_tokens, 1, None, n_batch=64, n_ubatch=32, flash_attn=flash_attn, n_gpu_layers=-1)
    return prefill_then_decode(llm, tokens, 16).tolist()


# ---- the tests ----

def on_device(buffers) -> bool:
    return any(re.fullmatch(r"Vulkan\d+", b) for b in buffers)


def test_the_device_is_lavapipe(vulkan_bin_dir):
    devices = run_with_library(vulkan_bin_dir, "test_vulkan", "vulkan_devices")
    assert any(name.startswith("Vulkan") and "llvmpipe" in description for name, description in devices), devices


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
def test_self_extend_nodes_run_on_the_device(vulkan_bin_dir, tiny_f32_gguf, flash_attn):
    """The op audit on the live device: Self-Extend adds no node that the Vulkan device refuses or that
    runs on the CPU, and the path its probes took is the documented one."""
    extended, vanilla = (run_with_library(vulkan_bin_dir, "test_vulkan", "offloaded_graph", str(tiny_f32_gguf),
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
    if flash_attn:
        # ggml-vulkan has ggml_flash_attn_ext_lse (patch 0016): a flash attention per block at the model's own head
        # size, each continuing the one before, and no flash attention over the doubled head size
        lse_nodes = [(name, buffers) for op, name, buffers, _ in extended["nodes"] if op == "FLASH_ATTN_EXT_LSE"]
        assert lse_nodes and all(on_device(buffers) for _, buffers in lse_nodes), lse_nodes
        assert "FLASH_ATTN_EXT" not in ops and "kqv_self_extend_flash" not in extended["widths"], ops
        print("Vulkan, flash attention: one FLASH_ATTN_EXT_LSE per block of cells, on the device")
    else:
        # ggml-vulkan has ggml_mul_mat_concat (patch 0015): the score blocks written in place
        score_ops = {op for op, name, _, _ in extended["nodes"] if name.startswith("kq_self_extend")}
        assert score_ops == {"MUL_MAT_CONCAT"} and "FLASH_ATTN_EXT" not in ops, score_ops
        print("Vulkan, no flash attention: score blocks written in place (MUL_MAT_CONCAT), transposed V cache")


@pytest.fixture(scope="module")
def device_tolerance(vulkan_bin_dir, request):
    """Twice the device's largest max |logit error| with Self-Extend off (every tiny architecture, flash
    attention off and on, against the float64 reference), or the CPU's bar where that is larger."""
    from selfextend_gguf.testing.parity import random_tokens, reference_logits
    n_tokens = 120
    errors = {}
    for model, reference in VANILLA_MODELS:
        path, ref = request.getfixturevalue(model), request.getfixturevalue(reference)
        expected = reference_logits(ref, random_tokens(n_tokens, seed=11), 1, None)
        for flash_attn in (False, True):
            logits = np.asarray(run_with_library(vulkan_bin_dir, "test_vulkan", "device_vanilla_logits", str(path),
                                                 n_tokens, flash_attn))
            errors[f"{model}{' flash' if flash_attn else ''}"] = float(np.abs(logits - expected).max())
    tolerance = max(1e-3, 2 * max(errors.values()))
    print("Vulkan (llvmpipe), Self-Extend off, max |logit error| against the reference:",
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), f"-> parity bar {tolerance:.2e}")
    return tolerance


def test_parity_suite_on_the_device(vulkan_bin_dir, device_tolerance, tmp_path):
    """The parity tests again, every layer on the llvmpipe device, with the bar fitted to the device."""
    junit = tmp_path / "parity.xml"
    env = dict(library_env(vulkan_bin_dir), SELFEXTEND_TEST_N_GPU_LAYERS="-1",
               SELFEXTEND_TEST_TOLERANCE=repr(device_tolerance))  # GGML_VK_VISIBLE_DEVICES: set by vulkan_bin_dir
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rP", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *PARITY_FILES, "-k", PARITY_DESELECT], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = ElementTree.parse(junit).getroot()
    suite = summary if summary.tag == "testsuite" else summary.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    line = f"parity on Vulkan (llvmpipe), bar {device_tolerance:.2e}: {counts}"
    per_case = sorted({l for l in done.stdout.splitlines() if l.startswith(("per case:", "SmolLM2 ")) or "max |diff|" in l and "->" in l})
    print(line, *per_case, sep="\n")
    (ROOT / "build" / "vulkan-parity.txt").write_text("\n".join([line, *per_case]) + "\n")  # .ci/run prints it
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0
    assert counts["tests"] >= 60, counts  # the suite ran, not a handful of it
    assert sum(l.startswith("per case:") for l in per_case) == 12, per_case  # 6 architectures, flash off and on


def test_group_size_one_matches_unpatched_vulkan(vulkan_bin_dir, tiny_f32_gguf):
    """G = 1 with every layer on the device: the same logits as the Vulkan build without the Self-Extend
    patches (only 0011, the header fix, which changes no computation)."""
    unpatched = build_llama_cpp(VULKAN_UNPATCHED_BUILD, ["-DGGML_VULKAN=ON", "-DSELFEXTEND_BUILD_TOOLS=OFF",
                                                         "-DSELFEXTEND_APPLY_PATCHES=OFF"], ["llama"])
    patched_logits = np.asarray(run_with_library(vulkan_bin_dir, "test_vulkan", "vanilla_logits",
                                                 str(tiny_f32_gguf), 160))
    unpatched_logits = np.asarray(run_with_library(unpatched, "test_vulkan", "vanilla_logits",
                                                   str(tiny_f32_gguf), 160))
    assert np.array_equal(patched_logits, unpatched_logits), np.abs(patched_logits - unpatched_logits).max()


# what ggml-vulkan answers in llama.cpp's op harness for the cases of patches 0004, 0008 and 0017 that run here (the cases
# whose parameters match the pattern, None: all), and how many there are:
#   FLASH_ATTN_EXT_LSE (patch 0016): the 83 cases of head sizes 64 and 128 pass against the CPU, the continued ones
#     with masks that are blocks of columns of one mask (which ggml-vulkan copies to a contiguous mask first). On
#     lavapipe 26 of them write their output directly (among them the 8 of 512 queries, or of one query over 32 KV
#     heads), the others take the split-k reduction: a log-sum-exp off by 1 in the direct path fails those 26. The 37
#     cases of head sizes 256 and 192 are left to scripts/vulkan_op_harness.py: llvmpipe compiles each of their shader
#     variants for minutes (the 75 took 8.4 min with Mesa's shader cache empty).
#   MUL_MAT_CONCAT (patch 0015): the 18 F16 cases and the F32 one pass against the CPU. Refused: the 18 Q8_0 cases
#     (a quantized K view that is not contiguous, which ggml-vulkan's MUL_MAT refuses too: plain attention on a Q8_0
#     cache without flash attention runs its products on the CPU there), and the contiguous case, whose second
#     product starts at column 129, 516 bytes in, off lavapipe's 16-byte descriptor alignment.
#   MUL_MAT (patch 0017): the 4 cases of an F32 B with strided rows over 67 columns, as Self-Extend's products of V
#     and one block of probabilities read it: row strides of 1600 floats (read in place) and 1601 (copied first).
#     The in-place read with the rows' length as the stride fails the two of 1600.
OP_HARNESS_ON_VULKAN = {"FLASH_ATTN_EXT_LSE": ("hsk=(64|128),", {"OK": 83}),
                        "MUL_MAT_CONCAT": (None, {"OK": 19, "not supported": 19}),
                        "MUL_MAT": ("n=67,k=15(36|31),.*k_v=160[01],", {"OK": 4})}


@pytest.mark.parametrize("op", sorted(OP_HARNESS_ON_VULKAN))
def test_the_ops_in_llama_cpps_op_harness(vulkan_bin_dir, op):
    """llama.cpp's test-backend-ops with the cases of patches 0004, 0008 and 0017 (tests/test_backend_ops_cases.py), on
    Vulkan0 against the CPU: each case passes or is refused by supports_op (a refused op runs the composed paths)."""
    from test_backend_ops_cases import N_CASES, run_cases
    params, expected = OP_HARNESS_ON_VULKAN[op]
    assert params or sum(expected.values()) == N_CASES[op]
    assert run_cases(vulkan_bin_dir, "Vulkan0", op, params) == expected
