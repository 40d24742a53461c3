"""Methods compared on the same cells, and the G/W sensitivity of exact Self-Extend.

A retrieval cell is one (depth, seed) at one length. Two methods are compared only on the cells
both measured, so a grid that is still running never flatters the one with fewer cells.

    python -m selfextend_gguf.evaluate.compare better-of --methods chunked,yarn --length 16384 a.json b.json
    python -m selfextend_gguf.evaluate.compare gw --length 16384 docs/long_context/passkey_16k_*.json
    python -m selfextend_gguf.evaluate.compare row --method chunked --seeds 0 --length 16384 a.json

`gw` prints the sensitivity table: every exact setting measured at the length (exact-auto counted
as the G and W it resolves to), its accuracy on the cells every setting has, and whether the
automatic rule's choice is within one cell of the best.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from .. import settings
from . import names, results_file


def _cells(results, task, length) -> dict:
    """method -> {(depth, seed): correct} of the measured (not failed) cells."""
    got = defaultdict(dict)
    for r in results.values():
        if r["task"] == task and r["length"] == length and "error" not in r:
            got[r["method"]][(round(r["depth"], 2), r["seed"])] = bool(r["correct"])
    return got


def shared(cells_by_method: dict, methods) -> set:
    """The (depth, seed) cells every one of methods has."""
    sets = [set(cells_by_method.get(m, {})) for m in methods]
    return set.intersection(*sets) if sets else set()


def better_of(results, methods, length, task="passkey") -> str:
    """The method with the most correct cells among the cells all of them measured (the first
    named wins a tie). ValueError when they share no cell."""
    got = _cells(results, task, length)
    common = shared(got, methods)
    if not common:
        raise ValueError(f"{', '.join(methods)} share no measured {task} cell at {length} tokens")
    return max(methods, key=lambda m: (sum(got[m][c] for c in common), -list(methods).index(m)))


def against_table(results, methods, length, task="passkey") -> str:
    """Markdown: the first of methods against each of the others, on the cells the two share,
    with the cells where they differ."""
    got = _cells(results, task, length)
    if not methods or methods[0] not in got:
        return ""   # e.g. a G/W sweep's own file: no exact-auto, chunked or yarn cell in it
    reference, others = methods[0], [m for m in methods[1:] if m in got]
    if not others:
        return ""
    out = [f"### {task} at {length} tokens: {reference} against the others, on the cells both measured\n",
           f"| method | cells both measured | method correct | {reference} correct | cells where they differ |",
           "|---|---|---|---|---|"]
    for m in others:
        common = sorted(shared(got, [reference, m]))
        if not common:
            continue
        differ = [f"{d:.0%} s{seed} ({m if got[m][(d, seed)] else reference} right)" for d, seed in common
                  if got[m][(d, seed)] != got[reference][(d, seed)]]
        out.append(f"| {m} | {len(common)} | {sum(got[m][c] for c in common)} | "
                   f"{sum(got[reference][c] for c in common)} | {', '.join(differ) or 'none'} |")
    return "\n".join(out) + "\n" if len(out) > 3 else ""


def depth_row(results, method, length, seeds, depths, task="passkey") -> str:
    """One row of docs/long_context.md's by-depth tables: "correct/measured" per depth over the
    given seeds ("-" where none is measured), then the accuracy over the measured cells."""
    got = _cells(results, task, length).get(method, {})
    values, right, measured = [], 0, 0
    for d in depths:
        hits = [got[(round(d, 2), seed)] for seed in seeds if (round(d, 2), seed) in got]
        values.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
        right, measured = right + sum(hits), measured + len(hits)
    total = f"{right}/{measured} = {right / measured:.2f}" if measured else "-"
    return " | ".join(values) + f" | {total}"


# ---------------------------------------------------------------------- G/W sensitivity

def exact_setting(method: str, length: int, n_ctx_train: int) -> tuple | None:
    """(G, W) that an exact method name runs at this length; None for other methods."""
    base, options = names.parse(method)
    if base != "exact":
        return None
    if options:
        return options["group_size"], options["window"]
    chosen = settings.resolve("auto", None, length, n_ctx_train)
    return (chosen.group_size, chosen.neighbor_window) if chosen.enabled else (1, 0)


def sensitivity(results, length, n_ctx_train, task="passkey") -> dict:
    """The G/W sweep at one length:
        settings   {(G, W): {(depth, seed): correct}} over the cells every setting measured
        cells      those shared cells, sorted
        errors     {(G, W): message} for settings that cannot run at this length
        auto       (G, W) that exact-auto resolves to
        best       the highest number of correct cells
        auto_ok    whether auto's setting is within one cell of the best (None if not measured)
    """
    merged = defaultdict(dict)
    errors = {}
    for r in results.values():
        if r["task"] != task or r["length"] != length:
            continue
        gw = exact_setting(r["method"], length, n_ctx_train)
        if gw is None:
            continue
        if "error" in r:
            errors[gw] = r["error"]
        else:
            merged[gw][(round(r["depth"], 2), r["seed"])] = bool(r["correct"])
    common = sorted(shared(merged, list(merged)))
    table = {gw: {c: hits[c] for c in common} for gw, hits in merged.items()}
    auto = exact_setting("exact-auto", length, n_ctx_train)
    best = max((sum(h.values()) for h in table.values()), default=0)
    auto_ok = (sum(table[auto].values()) >= best - 1) if auto in table and common else None
    return {"settings": table, "cells": common, "errors": errors, "auto": auto, "best": best,
            "auto_ok": auto_ok}


def sensitivity_table(results, length, n_ctx_train, task="passkey") -> str:
    """Markdown of sensitivity(): one row per (G, W), the auto setting in bold."""
    s = sensitivity(results, length, n_ctx_train, task)
    if len(s["settings"]) + len(s["errors"]) < 2 or not s["cells"]:
        return ""
    seeds = sorted({seed for _, seed in s["cells"]})
    depths = sorted({depth for depth, _ in s["cells"]})
    out = [f"### G/W sensitivity, {task} at {length} tokens ({len(s['cells'])} shared cells: depths "
           f"{', '.join(f'{d:.0%}' for d in depths)}; seeds {', '.join(map(str, seeds))})\n",
           "| G | W | " + " | ".join(f"seed {seed}" for seed in seeds) + " | correct | accuracy |",
           "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for gw in sorted(set(s["settings"]) | set(s["errors"])):
        label = [f"**{x}**" if gw == s["auto"] else str(x) for x in gw]
        if gw in s["errors"]:
            out.append(f"| {label[0]} | {label[1]} | " + " | ".join("-" for _ in seeds)
                       + " | cannot run | - |")
            continue
        hits = s["settings"][gw]
        per_seed = [f"{sum(v for (d, sd), v in hits.items() if sd == seed)}/{len(depths)}" for seed in seeds]
        n = sum(hits.values())
        out.append(f"| {label[0]} | {label[1]} | " + " | ".join(per_seed) + f" | {n}/{len(hits)} | {n / len(hits):.2f} |")
    if s["auto_ok"] is not None:
        out += ["", f"The automatic setting (bold, G={s['auto'][0]} W={s['auto'][1]}) is "
                + ("within one cell of the best" if s["auto_ok"] else "more than one cell below the best")
                + f" ({sum(s['settings'][s['auto']].values())} vs {s['best']} correct)."]
    errors = sorted({f"- G={g} W={w}: {msg}" for (g, w), msg in s["errors"].items()})
    if errors:
        out += ["", "Settings that cannot run at this length:\n"] + errors
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- command line

def _load(paths) -> tuple:
    run = results_file.merge([results_file.load_run(Path(p)) for p in paths])
    return run["results"], run.get("n_ctx_train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    better = sub.add_parser("better-of", help="print the more accurate method on the cells they share")
    better.add_argument("--methods", required=True, help="comma list of two or more method names")
    gw = sub.add_parser("gw", help="print the G/W sensitivity table")
    row = sub.add_parser("row", help="print one by-depth row (correct/measured per depth, then accuracy)")
    row.add_argument("--method", required=True)
    row.add_argument("--seeds", default="0", help="comma list of seeds counted together")
    row.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    for p in (better, gw, row):
        p.add_argument("files", nargs="+", help="results JSON files")
        p.add_argument("--length", type=int, required=True)
        p.add_argument("--task", default="passkey", choices=("passkey", "needle"))
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        parser.error(f"no results file {', '.join(missing)}")
    if args.command == "better-of":
        methods = [m for m in args.methods.split(",") if m]
        if len(methods) < 2:
            parser.error(f"--methods needs two or more method names, got {args.methods!r}")
        results, _ = _load(args.files)
        try:
            print(better_of(results, methods, args.length, args.task))
        except ValueError as e:
            parser.error(str(e))
        return 0
    results, n_ctx_train = _load(args.files)
    if args.command == "row":
        print(depth_row(results, args.method, args.length, [int(x) for x in args.seeds.split(",")],
                        [float(x) for x in args.depths.split(",")], args.task))
        return 0
    if not n_ctx_train:
        parser.error("the results files do not say the model's trained context (n_ctx_train)")
    print(sensitivity_table(results, args.length, n_ctx_train, args.task) or "no G/W sweep at this length")
    return 0


if __name__ == "__main__":
    sys.exit(main())
