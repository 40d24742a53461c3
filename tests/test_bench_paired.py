"""scripts/bench_paired.py on a tiny model: both baselines run the real library end to end and write the
JSON that the README's figures come from (the figures themselves are measured by hand, not here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("baseline, name", [("off", "off"), ("other-path", "self-extend on the other path")])
def test_bench_paired_writes_both_sides_and_their_ratios(tiny_f32_gguf, tmp_path, baseline, name):
    out = tmp_path / "paired.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_paired.py"), "--model", str(tiny_f32_gguf),
                           "--prefill", "128", "--decode-at", "96", "--decode", "4", "--group-size", "4",
                           "--window", "16", "--flash-attn", "on", "--baseline", baseline, "--repeats", "2", "--batch", "48",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Self-Extend vs {name}: prefill" in done.stdout
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        for key in ("prefill_tps", "decode_tps"):
            assert set(run[key]) == {"self-extend", name} and min(run[key].values()) > 0
        # one time per 48-token batch of the 128-token prefill (48, 48, 32), on each side
        assert {k: len(v) for k, v in run["prefill_batches_ms"].items()} == {"self-extend": 3, name: 3}
    assert all(result["summary"][key] > 0 for key in ("prefill_ratio", "decode_ratio", "decode_step_ratio"))


def test_bench_paired_refuses_a_decode_depth_past_the_prefill(tiny_f32_gguf):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_paired.py"), "--model", str(tiny_f32_gguf),
                           "--prefill", "128", "--decode-at", "128"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--decode-at 128 must be below --prefill 128" in done.stderr and "Traceback" not in done.stderr
