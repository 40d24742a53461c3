"""scripts/gpu_check.sh on the CPU, so that it cannot rot while no GPU is at hand: its argument
handling, a dry run that prints each step (and every file a step names exists), its summary on the
real outputs of pytest and bench_speed.py, and CMakeLists.txt's check of a prepared tree."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [[], ["--budget"], ["--budget", "soon", "out"], ["--frobnicate", "out"],
                                  ["out", "other"]])
def test_bad_arguments_print_the_usage(args):
    done = gpu_check(*args)
    assert done.returncode == 2
    assert "usage: scripts/gpu_check.sh" in done.stderr


def test_dry_run_prints_every_step(tmp_path):
    done = gpu_check("--dry-run", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(",")[0].lstrip("[") for line in lines[:-1]] == [
        "unpack", "install", "build", "parity", "model", "bench_16k", "bench_32k"]
    assert lines[-1].startswith("[summary]")
    text = done.stdout
    assert "-DGGML_CUDA=ON" in text and "-DCMAKE_CUDA_ARCHITECTURES=90" in text
    assert "SELFEXTEND_LLAMA_CPP_TREE" in text
    assert "--n-gpu-layers -1" in text and "--group-size 8" in text and "--shape smollm2" in text
    # every test file and script the steps name is in the checkout
    named = {word for line in lines for word in line.split() if word.startswith(("tests/", "scripts/"))}
    assert named >= {"tests/test_parity.py", "scripts/bench_speed.py", "scripts/make_tiny_gguf.py"}
    for path in named:
        assert (ROOT / path).exists(), path
    assert (tmp_path / "out").is_dir()


def test_dry_run_parity_selection_keeps_gpu_cases():
    """The -k expression of the parity step leaves out only the CPU-only fallback builds' cases."""
    line = next(line for line in gpu_check("--dry-run", "/tmp/gpu-check-dry").stdout.splitlines()
                if line.startswith("[parity"))
    words = line.split()
    files = [w for w in words if w.startswith("tests/")]
    expression = line.split("-k ", 1)[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *files, "-k", expression], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(collected) > 50
    assert not any("no_flash_lse" in c or "fallbacks" in c for c in collected)
    assert any("flash_attention_matches_reference" in c for c in collected)
    assert any("Q8_0" in c or "q8_0" in c for c in collected)


def test_summary_of_real_outputs(tmp_path, smollm2_path):
    """pytest's JUnit XML and bench_speed.py's JSON, as the run leaves them, become the JSON and Markdown."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.tsv").write_text("unpack\t0\t1\nbuild\t0\t200\nparity\t1\t90\n")
    tests = tmp_path / "test_two.py"
    tests.write_text("def test_passes():\n    assert True\n\ndef test_fails():\n    assert False\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests),
                    f"--junitxml={out / 'parity.xml'}"], cwd=tmp_path, capture_output=True, timeout=120)
    bench = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_speed.py"), "--model", str(smollm2_path),
                            "--prefill", "64", "--decode-at", "48", "--decode", "2", "--window", "16",
                            "--json", str(out / "bench_16k.json")], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bench.returncode == 0, bench.stderr[-2000:]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), str(out), "321"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["seconds"] == 321 and [s["step"] for s in summary["steps"]] == ["unpack", "build", "parity"]
    assert summary["parity"]["passed"] == 1 and summary["parity"]["failed"] == 1
    assert summary["bench_32k"] is None
    results = summary["bench_16k"]
    assert set(results) == {"self-extend", "off", "self-extend, flash attn", "off, flash attn"}
    assert results["off"]["prefill_vs_off"] == 1.0 and results["self-extend"]["prefill_tps"] > 0
    text = (out / "gpu_check.md").read_text()
    assert "1 passed, 1 failed" in text and "test_fails" in text and "| self-extend, flash attn |" in text
    assert "## Speed, 32k\n\ndid not run" in text


def test_cmake_refuses_a_tree_from_other_patches(tmp_path):
    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed (it builds the package)")
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    (tree / ".selfextend-patches.stamp").write_text("not the key of these patches")
    done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"),
                           f"-DSELFEXTEND_LLAMA_CPP_TREE={tree}"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "was not prepared from this checkout's" in done.stderr


def test_shape_option_writes_llama_weights_of_that_shape(tmp_path, monkeypatch):
    """make_tiny_gguf --shape (the speed runs' model), with a small shape put in SHAPES for the test."""
    from selfextend_gguf.gguf_info import read_model_info
    from selfextend_gguf.reference.gguf_loader import open_gguf, read_hparams
    from selfextend_gguf.testing import tiny_gguf
    monkeypatch.setitem(tiny_gguf.SHAPES, "small", dict(n_embd=96, n_layer=3, n_head=6, n_head_kv=2, n_ff=160,
                                                        n_ctx_train=512, rope_freq_base=50000.0))
    tiny_gguf.main([str(tmp_path / "small.gguf"), "--shape", "small", "--type", "q8_0"])
    hp = read_hparams(open_gguf(tmp_path / "small.gguf"))
    assert (hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_ff, hp.rope_base) == (96, 3, 6, 2, 160, 50000.0)
    assert read_model_info(tmp_path / "small.gguf").n_ctx_train == 512
    with pytest.raises(SystemExit):
        tiny_gguf.main([str(tmp_path / "x.gguf"), "--shape", "small", "--arch", "qwen2"])
    assert set(tiny_gguf.SHAPES) >= {"smollm2", "llama-1b"}
