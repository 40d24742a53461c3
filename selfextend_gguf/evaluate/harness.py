"""The sweep runner: cells -> one resumable JSON file (results_file.py) -> a Markdown report.

A cell is one measurement: (task, method, length, depth, seed, flash_attn). Its result is
written to the JSON file as soon as it is measured (atomic replace), under a key naming the
cell, so a killed sweep started again with the same file skips what is done.

    tasks       passkey, needle   exact-match retrieval of 5 digits, greedy, ANSWER_TOKENS new tokens
                perplexity        NLL of each of the last n_last tokens of a real text
                throughput        prefill and decode tokens/s against filled context (one curve per length)
"""
from __future__ import annotations

import math
import os
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from . import compare, names, prompts, timing
from .results_file import load_run, save_run

TASKS = ("passkey", "needle", "perplexity", "throughput")
ANSWER_TOKENS = 10
DECODE_TOKENS = 32    # tokens timed for decode throughput
PPL_TEXT_END = 4       # perplexity scores the text tokens before 4 x the trained context


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    length: int
    depth: float = 0.0
    seed: int = 0
    flash_attn: bool = True

    @property
    def key(self) -> str:
        return (f"{self.task}|{self.method}|{self.length}|{self.depth:.2f}|{self.seed}|"
                f"{'fa' if self.flash_attn else 'nofa'}")

    @property
    def model_group(self) -> tuple:
        """Cells that share one loaded model (same method, context and attention kernel)."""
        return (self.method, self.length, self.flash_attn)


def plan(tasks, method_names, lengths, depths=prompts.DEPTHS, seeds=(0,), ppl_lengths=(),
         throughput_lengths=(), flash_attn=(True,)) -> list:
    """Every cell of the sweep, in the order they run: method by method, length by length,
    depths in two descending passes (every other depth, then the rest: a sweep stopped early
    still spans the depth range, and each prompt re-uses its predecessor's common prefix)."""
    for name in method_names:
        names.parse(name)   # fail before any work on a typo
    cells = []
    for name in method_names:
        for fa in flash_attn:
            for length in lengths:
                for seed in seeds:
                    for task in ("passkey", "needle"):
                        if task in tasks:
                            cells += [Cell(task, name, length, d, seed, fa) for d in depth_order(depths)]
            if "perplexity" in tasks:
                cells += [Cell("perplexity", name, n, flash_attn=fa) for n in ppl_lengths]
    if "throughput" in tasks:
        cells += [Cell("throughput", name, n, flash_attn=fa)
                  for name in method_names for fa in (True, False) for n in throughput_lengths]
    return cells


def depth_order(depths) -> list:
    descending = sorted(set(depths), reverse=True)
    return descending[::2] + descending[1::2]


# ---------------------------------------------------------------------- the results file

def machine_description() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
            f"load average {load:.1f} at start")


# ---------------------------------------------------------------------- measuring one cell

class Measurer:
    """Loads models on demand (one at a time) and measures cells."""

    def __init__(self, model_path, n_threads=2, haystack=None, ppl_last=256, n_batch=names.N_BATCH):
        from ..gguf_info import read_model_info
        self.model_path = Path(model_path)
        self.n_ctx_train = read_model_info(self.model_path).n_ctx_train
        self.n_threads = n_threads
        self.haystack_path = haystack
        self.ppl_last = ppl_last
        self.n_batch = n_batch    # throughput times each batch
        self._sentences = None
        self._runner = None
        self._group = None

    @property
    def sentences(self) -> list:
        if self._sentences is None:
            self._sentences = prompts.load_haystack(self.haystack_path)
        return self._sentences

    def runner(self, cell: Cell):
        from . import methods   # loads llama.cpp: only when something is measured
        if self._group != cell.model_group:
            self.close()
            self._runner = methods.make(cell.method, self.model_path, cell.length,
                                        n_threads=self.n_threads, flash_attn=cell.flash_attn,
                                        n_batch=self.n_batch)
            self._group = cell.model_group
        return self._runner

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self._runner, self._group = None, None

    def tokenizer(self, runner):
        llm = runner.llm
        bos = [llm.token_bos()] if llm._model.add_bos_token() and llm.token_bos() >= 0 else []
        return (lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)), bos

    def measure(self, cell: Cell) -> dict:
        """The cell's result; {"error": ...} when the method cannot run at this length (e.g. G/W
        that do not reach it), so that a sweep goes on with the other cells."""
        started = time.perf_counter()
        try:
            runner = self.runner(cell)
        except ValueError as e:
            result = {"error": str(e)}
        else:
            tasks = {"passkey": self._passkey, "needle": self._needle, "perplexity": self._perplexity,
                     "throughput": self._throughput}
            result = tasks[cell.task](runner, cell)
        result.update(asdict(cell), setting=names.describe(cell.method, cell.length, self.n_ctx_train),
                      seconds=round(time.perf_counter() - started, 2))
        return result

    def _retrieval(self, runner, cell, prompt):
        new = runner.generate(prompt.tokens, ANSWER_TOKENS)
        answer = runner.llm.detokenize(new).decode("utf-8", errors="replace")
        return {"key": prompt.key, "answer": answer, "correct": prompts.score(answer, prompt.key),
                "n_prompt": len(prompt.tokens), "needle_start": prompt.needle_start,
                "n_read": len(runner.prepare(prompt.tokens))}

    def _passkey(self, runner, cell):
        tokenize, bos = self.tokenizer(runner)
        return self._retrieval(runner, cell, prompts.passkey_prompt(tokenize, bos, cell.length,
                                                                    cell.depth, cell.seed))

    def _needle(self, runner, cell):
        tokenize, bos = self.tokenizer(runner)
        return self._retrieval(runner, cell, prompts.needle_prompt(tokenize, bos, cell.length, cell.depth,
                                                                   cell.seed, self.sentences))

    def _perplexity(self, runner, cell):
        # every length scores the same last tokens of the text: those before its token PPL_TEXT_END x
        # the trained context (or the length, if longer), after as much context as the length holds
        tokenize, bos = self.tokenizer(runner)
        end = max(PPL_TEXT_END * self.n_ctx_train, cell.length)
        tokens = prompts.text_window(tokenize, bos, self.sentences, cell.length - 16, end)
        nll = runner.nll_of_last(tokens, self.ppl_last)
        return {"n_last": len(nll), "nll": [round(float(x), 4) for x in nll],
                "ppl": float(math.exp(float(nll.mean())))}

    def _throughput(self, runner, cell):
        """Speed against filled context, as llama-bench's pp / tg at a depth: real text is read
        in batches of n_batch tokens, each timed (prefill tokens/s from the depth the batch starts
        at), and after each batch DECODE_TOKENS greedy tokens are timed (decode tokens/s at that
        depth). The decoded tokens stay in the context. Methods are configured for cell.length;
        sink reads only what its trained-size context holds, so its curve stops there."""
        tokenize, bos = self.tokenizer(runner)
        tokens = runner.prepare(prompts.text_tokens(tokenize, bos, self.sentences, cell.length - 16))
        n_batches = -(-len(tokens) // runner.n_batch)
        tokens = tokens[:runner.llm.n_ctx() - 16 - DECODE_TOKENS * n_batches]
        runner.forget_after(0)
        getattr(runner, "snapshots", {}).clear()   # time a full prefill, also for chunked
        curve, read = [], []
        for start in range(0, len(tokens), runner.n_batch):
            batch, token = timing.read_batches(runner, tokens[start:start + runner.n_batch])
            decode_depth = len(runner.cached)
            decode_s, _ = timing.decode_steps(runner, token, DECODE_TOKENS)
            read += batch
            curve.append({"depth": batch[0]["depth"], "prefill_tps": timing.tokens_per_second(batch),
                          "decode_depth": decode_depth, "decode_tps": DECODE_TOKENS / decode_s})
        return {"n_prefill": len(tokens), "prefill_tps": timing.tokens_per_second(read),
                "decode_tps": curve[-1]["decode_tps"], "n_decode": DECODE_TOKENS, "curve": curve}


# ---------------------------------------------------------------------- the sweep

def sweep(cells, out_path, model_path, n_threads=2, haystack=None, ppl_last=256, command="",
          show_progress=True, measurer=None) -> dict:
    """Measure every cell not yet in out_path; returns the run dict (also saved)."""
    out_path = Path(out_path)
    run = load_run(out_path)
    run["runs"].append({"command": command, "model": str(model_path), "machine": machine_description(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    todo = [c for c in cells if c.key not in run["results"]]
    measurer = measurer or Measurer(model_path, n_threads=n_threads, haystack=haystack, ppl_last=ppl_last)
    run["n_ctx_train"] = measurer.n_ctx_train
    save_run(out_path, run)
    progress = _progress(show_progress)
    try:
        with progress:
            bar = progress.add_task("cells", total=len(cells), completed=len(cells) - len(todo))
            for cell in todo:
                progress.update(bar, description=f"{cell.task} {cell.method} {cell.length} d={cell.depth:.1f}")
                run["results"][cell.key] = measurer.measure(cell)
                save_run(out_path, run)
                progress.advance(bar)
    finally:
        measurer.close()
    return run


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), disable=not enabled)


# ---------------------------------------------------------------------- the report

def _grouped(results, task):
    rows = [r for r in results.values() if r["task"] == task and "error" not in r]
    return rows, sorted({r["method"] for r in rows}, key=_method_order), sorted({r["length"] for r in rows})


def _method_order(name):
    base = name.split("-")[0]
    return (names.METHODS.index(base) if base in names.METHODS else 99, name)


def _k(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def retrieval_tables(results, task, n_ctx_train=None) -> str:
    rows, method_names, lengths = _grouped(results, task)
    if not rows:
        return ""
    cell = defaultdict(list)
    for r in rows:
        cell[(r["method"], r["length"])].append(r)
    out = [f"### {task}: exact-match accuracy (cells measured)\n",
           "| method | " + " | ".join(_k(n) for n in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for name in method_names:
        values = []
        for n in lengths:
            got = cell.get((name, n), [])
            values.append(f"{sum(r['correct'] for r in got) / len(got):.2f} ({len(got)})" if got else "-")
        out.append(f"| {name} | " + " | ".join(values) + " |")
    for n in lengths:
        depths = sorted({r["depth"] for r in rows if r["length"] == n})
        out += ["", f"{task} at {_k(n)} tokens, by depth (correct / measured):\n",
                "| method | setting | " + " | ".join(f"{d:.0%}" for d in depths) + " |",
                "|---|---|" + "---|" * len(depths)]
        for name in method_names:
            got = cell.get((name, n), [])
            if not got:
                continue
            by_depth = defaultdict(list)
            for r in got:
                by_depth[r["depth"]].append(r["correct"])
            setting = names.describe(name, n, n_ctx_train) if n_ctx_train else got[0].get("setting", "")
            out.append(f"| {name} | {setting} | " + " | ".join(
                f"{sum(by_depth[d])}/{len(by_depth[d])}" if by_depth[d] else "-" for d in depths) + " |")
    return "\n".join(out) + "\n"


def perplexity_table(results) -> str:
    rows, method_names, lengths = _grouped(results, "perplexity")
    if not rows:
        return ""
    ppl = {(r["method"], r["length"]): r["ppl"] for r in rows}
    out = [f"### perplexity of the last {rows[0]['n_last']} tokens (ratio to the shortest length)\n",
           "| method | " + " | ".join(_k(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name in method_names:
        base = ppl.get((name, lengths[0]))
        values = []
        for n in lengths:
            p = ppl.get((name, n))
            values.append("-" if p is None else f"{p:.2f}" + (f" ({p / base:.2f}x)" if base and n != lengths[0] else ""))
        out.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


def throughput_table(results) -> str:
    """Per context length: whole-prompt prefill speed and its ratio to vanilla with the same
    kernel, then prefill / decode tokens/s at each filled depth."""
    rows, method_names, lengths = _grouped(results, "throughput")
    if not rows:
        return ""
    got = {(r["method"], r["flash_attn"], r["length"]): r for r in rows}
    out = []
    for n in lengths:
        depths = sorted({point["depth"] for r in rows if r["length"] == n for point in r.get("curve", [])})
        out += [f"### throughput with a {_k(n)} context, tokens/s: prefill / decode against filled depth\n",
                "Each depth column: the prefill speed of the batch read from that depth / the decode speed "
                "right after that batch.\n",
                "| method | flash attn | whole prompt | vs vanilla | " + " | ".join(f"{d / 1024:.1f}k" if d else "0" for d in depths)
                + " |", "|---|---|---|---|" + "---|" * len(depths)]
        for name in method_names:
            for fa in (True, False):
                r = got.get((name, fa, n))
                if r is None:
                    continue
                base = got.get(("vanilla", fa, n))
                ratio = f"{r['prefill_tps'] / base['prefill_tps']:.2f}x" if base else "-"
                at = {point["depth"]: point for point in r.get("curve", [])}
                out.append(f"| {name} | {'on' if fa else 'off'} | {r['prefill_tps']:.0f} ({r['n_prefill']} tokens) | "
                           f"{ratio} | " + " | ".join(f"{at[d]['prefill_tps']:.0f} / {at[d]['decode_tps']:.1f}"
                                                     if d in at else "-" for d in depths) + " |")
        out.append("")
    return "\n".join(out)


def markdown(run: dict) -> str:
    results = run["results"]
    errors = sorted({f"- {r['method']} at {r['length']} tokens: {r['error']}" for r in results.values()
                     if "error" in r})
    n_ctx_train = run.get("n_ctx_train")
    lengths = sorted({r["length"] for r in results.values() if r["task"] in ("passkey", "needle")})
    baselines = [m for m in ("exact-auto", "chunked", "yarn") if any(r["method"] == m for r in results.values())]
    parts = [retrieval_tables(results, "passkey", n_ctx_train),
             *(compare.against_table(results, baselines, n, task) for task in ("passkey", "needle") for n in lengths),
             *(compare.sensitivity_table(results, n, n_ctx_train) for n in lengths if n_ctx_train),
             retrieval_tables(results, "needle", n_ctx_train),
             perplexity_table(results), throughput_table(results),
             "### cells that could not run\n\n" + "\n".join(errors) + "\n" if errors else ""]
    return "\n".join(p for p in parts if p)
