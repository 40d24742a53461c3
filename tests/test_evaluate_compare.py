"""Methods compared on shared cells, and the G/W sensitivity table and plot
(selfextend_gguf/evaluate/compare.py), on results files written the way the harness writes them."""
import json
import subprocess
import sys

import pytest

from selfextend_gguf.evaluate import compare, harness, plots, results_file

N_TRAIN = 8192
LENGTH = 16384   # 2x: exact-auto resolves to G=4 W=1024 here


def cell(method, depth, seed, correct, length=LENGTH, error=None):
    c = harness.Cell("passkey", method, length, depth, seed)
    r = {"task": "passkey", "method": method, "length": length, "depth": depth, "seed": seed,
         "flash_attn": True, "correct": correct}
    if error:
        r = {k: v for k, v in r.items() if k != "correct"} | {"error": error}
    return c.key, r


def results_of(*cells):
    return dict(cells)


def test_exact_auto_counts_as_the_setting_it_resolves_to():
    assert compare.exact_setting("exact-auto", LENGTH, N_TRAIN) == (4, 1024)
    assert compare.exact_setting("exact-auto", 32768, N_TRAIN) == (8, 1024)
    assert compare.exact_setting("exact-g3-w512", LENGTH, N_TRAIN) == (3, 512)
    assert compare.exact_setting("chunked", LENGTH, N_TRAIN) is None


def test_sensitivity_uses_only_the_cells_every_setting_measured():
    results = results_of(
        *(cell("exact-auto", d, 0, d < 0.8) for d in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)),
        *(cell("exact-g8-w1024", d, 0, True) for d in (0.0, 0.2, 0.4)),     # still running
        *(cell("exact-g2-w1024", d, 0, None, error="beyond reach") for d in (0.0, 0.2)),
        cell("exact-auto", 0.4, 0, True, length=8192))                          # other length
    s = compare.sensitivity(results, LENGTH, N_TRAIN)
    assert s["cells"] == [(0.0, 0), (0.2, 0), (0.4, 0)]
    assert set(s["settings"]) == {(4, 1024), (8, 1024)}
    assert s["errors"] == {(2, 1024): "beyond reach"}
    assert s["best"] == 3 and s["auto"] == (4, 1024) and s["auto_ok"] is True
    table = compare.sensitivity_table(results, LENGTH, N_TRAIN)
    assert "| **4** | **1024** | 3/3 | 3/3 | 1.00 |" in table
    assert "| 2 | 1024 | - | cannot run | - |" in table
    assert "within one cell of the best" in table


def test_sensitivity_says_when_auto_is_more_than_one_cell_below_the_best():
    depths = (0.0, 0.2, 0.4, 0.6)
    results = results_of(*(cell("exact-auto", d, s, d == 0.0) for d in depths for s in (0, 1)),
                         *(cell("exact-g4-w2048", d, s, True) for d in depths for s in (0, 1)))
    s = compare.sensitivity(results, LENGTH, N_TRAIN)
    assert s["best"] == 8 and sum(s["settings"][(4, 1024)].values()) == 2 and s["auto_ok"] is False
    table = compare.sensitivity_table(results, LENGTH, N_TRAIN)
    assert "more than one cell below the best (2 vs 8 correct)" in table
    assert "| 4 | 2048 | 4/4 | 4/4 | 8/8 | 1.00 |" in table


def test_against_table_compares_each_method_with_exact_on_their_shared_cells():
    results = results_of(*(cell("exact-auto", d, 0, d != 0.9) for d in (0.1, 0.5, 0.9)),
                         cell("yarn", 0.1, 0, False), cell("yarn", 0.9, 0, True),
                         cell("chunked", 0.5, 0, True), cell("chunked", 0.7, 0, True))
    table = compare.against_table(results, ["exact-auto", "chunked", "yarn"], LENGTH)
    assert "| chunked | 1 | 1 | 1 | none |" in table
    assert "| yarn | 2 | 1 | 1 | 10% s0 (exact-auto right), 90% s0 (yarn right) |" in table


def test_depth_row_counts_the_given_seeds_per_depth():
    results = results_of(cell("chunked", 0.0, 0, True), cell("chunked", 0.0, 1, False),
                         cell("chunked", 0.5, 1, True), cell("chunked", 0.5, 2, True))
    assert compare.depth_row(results, "chunked", LENGTH, [0, 1], [0.0, 0.5, 1.0]) == "1/2 | 1/1 | - | 2/3 = 0.67"
    assert compare.depth_row(results, "yarn", LENGTH, [0], [0.0]) == "- | -"


def test_better_of_counts_shared_cells_and_refuses_disjoint_grids():
    results = results_of(cell("chunked", 0.5, 0, True), cell("chunked", 0.7, 0, True),
                         cell("yarn", 0.5, 0, False), cell("yarn", 0.9, 0, True))
    assert compare.better_of(results, ["chunked", "yarn"], LENGTH) == "chunked"
    assert compare.better_of(results, ["yarn", "chunked"], LENGTH) == "chunked"
    with pytest.raises(ValueError, match="share no measured passkey cell"):
        compare.better_of(results_of(cell("chunked", 0.5, 0, True), cell("yarn", 0.9, 0, True)),
                          ["chunked", "yarn"], LENGTH)


def _write(path, results):
    run = {"version": results_file.FORMAT_VERSION, "runs": [], "results": results, "n_ctx_train": N_TRAIN}
    path.write_text(json.dumps(run))
    return str(path)


def test_command_line_better_of_and_gw(tmp_path):
    a = _write(tmp_path / "a.json", results_of(cell("chunked", 0.5, 0, False), cell("exact-auto", 0.5, 0, True),
                                               cell("exact-g3-w1024", 0.5, 0, True)))
    b = _write(tmp_path / "b.json", results_of(cell("yarn", 0.5, 0, True)))
    run = lambda *args: subprocess.run([sys.executable, "-m", "selfextend_gguf.evaluate.compare", *args],
                                       capture_output=True, text=True)
    done = run("better-of", "--methods", "chunked,yarn", "--length", str(LENGTH), a, b)
    assert done.returncode == 0 and done.stdout.strip() == "yarn"
    done = run("gw", "--length", str(LENGTH), a)
    assert done.returncode == 0 and "| 3 | 1024 | 1/1 | 1/1 | 1.00 |" in done.stdout
    done = run("row", "--method", "exact-auto", "--depths", "0.5,1", "--length", str(LENGTH), a)
    assert done.returncode == 0 and done.stdout.strip() == "1/1 | - | 1/1 = 1.00"
    done = run("better-of", "--methods", "chunked", "--length", str(LENGTH), a)
    assert done.returncode == 2 and "two or more method names" in done.stderr
    done = run("gw", "--length", str(LENGTH), str(tmp_path / "missing.json"))
    assert done.returncode == 2 and "no results file" in done.stderr and "Traceback" not in done.stderr


def test_report_and_plot_carry_the_sweep(tmp_path):
    results = results_of(*(cell(m, d, 0, d < 0.5) for m in ("exact-auto", "exact-g8-w1024", "exact-g4-w512")
                           for d in (0.0, 0.4, 0.8)))
    run = {"version": results_file.FORMAT_VERSION, "runs": [], "results": results, "n_ctx_train": N_TRAIN}
    assert "### G/W sensitivity, passkey at 16384 tokens" in harness.markdown(run)
    written = plots.write_all(run, tmp_path, prefix="r")
    assert tmp_path / "r_gw.png" in written and (tmp_path / "r_gw.png").stat().st_size > 10_000


def test_report_of_a_sweep_without_exact_auto_chunked_or_yarn():
    # the G/W sweep's own file holds only fixed settings: its report has no "against" table
    results = results_of(*(cell(m, d, 0, d < 0.5) for m in ("exact-g3-w1024", "exact-g6-w1024")
                           for d in (0.0, 0.4, 0.8)))
    assert compare.against_table(results, [], LENGTH) == ""
    run = {"version": results_file.FORMAT_VERSION, "runs": [], "results": results, "n_ctx_train": N_TRAIN}
    report = harness.markdown(run)
    assert "against the others" not in report and "exact-g3-w1024" in report
