"""llama.cpp's own op harness, tests/test-backend-ops.cpp, on the two ops the series adds: the cases that
patch 0004 (FLASH_ATTN_EXT_LSE) and patch 0008 (MUL_MAT_CONCAT) add to it, in the shapes Self-Extend uses
(head sizes 64, 128 and 256, GQA, F16 and Q8_0 K/V, masks, decode and prefill, continuing an earlier
result; two and three products side by side).

The harness checks a device against the CPU. With no GPU here, it runs every case on the CPU against a
second CPU backend (the harness's reference mode): that catches a case that crashes, asserts or gives NaN,
not a wrong value. The values are checked against ggml's own
operations by tests/test_ggml_mul_mat_concat.py and the parity tests; tests/test_vulkan.py runs the same
cases with Vulkan0 against the CPU, where both ops have kernels (patches 0015 and 0016)."""
import re
import subprocess

import pytest

from native_build import main_lib_dir, op_harness_program

# the cases each patch adds (tests/test-backend-ops.cpp, make_test_cases_eval)
N_CASES = {"FLASH_ATTN_EXT_LSE": 120, "MUL_MAT_CONCAT": 38}


def run_cases(library_dir, backend: str, op: str, params: str = None, timeout: float = 1200) -> dict:
    """test-backend-ops test -b backend -o op [-p params]: the number of cases (those whose parameters match the
    regular expression params) per outcome ("OK", "FAIL", "not supported")."""
    done = subprocess.run([str(op_harness_program(library_dir)), "test", "-b", backend, "-o", op,
                           *(["-p", params] if params else [])], capture_output=True, text=True, timeout=timeout)
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # its colours
    outcomes = {}
    for outcome in re.findall(rf"^\s*{op}\(.*\): (OK|FAIL|not supported)", text, re.M):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert done.returncode == 0 or outcomes.get("FAIL"), f"test-backend-ops exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return outcomes


@pytest.mark.parametrize("op", sorted(N_CASES))
def test_every_case_runs_on_the_cpu(op):
    assert run_cases(main_lib_dir(), "CPU", op) == {"OK": N_CASES[op]}
