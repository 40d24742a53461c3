"""llama.cpp's op harness (test-backend-ops) on Vulkan0 against the CPU, every case of the two ops the series adds.

tests/test_vulkan.py runs the cases that lavapipe compiles in minutes (FLASH_ATTN_EXT_LSE's of head sizes 64 and
128); this runs them all, those of head sizes 192 and 256 too, whose shader variants llvmpipe compiles for minutes
each. Needs build/vulkan (bash scripts/vulkan_check.sh builds it) and the README's .venv:

    GGML_VK_VISIBLE_DEVICES=0 python scripts/vulkan_op_harness.py [-p PARAMS_REGEX]
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_backend_ops_cases import N_CASES, run_cases  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", dest="params", help="only the cases whose parameters match this regular expression")
    args = parser.parse_args()
    library_dir = ROOT / "build" / "vulkan" / "bin"
    if not (library_dir / "libggml-vulkan.so").exists():
        print(f"no Vulkan build in {library_dir}: run bash scripts/vulkan_check.sh first", file=sys.stderr)
        return 2
    os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    failed = False
    for op in sorted(N_CASES):
        outcomes = run_cases(library_dir, "Vulkan0", op, args.params, timeout=None)
        print(f"{op}: {outcomes}", flush=True)
        failed |= bool(outcomes.get("FAIL"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
