"""Self-Extend against plain llama.cpp in one process, their work interleaved: speed ratios that a busy
spell of the machine cannot skew.

scripts/bench_speed.py measures each configuration in its own process, one after the other; on a
shared 2-core machine a single run of it can land one side in a quiet minute and the other in a busy
one (its 32k decode read 0.47x that way). Here both contexts live in one process and take turns:
each prefill batch (n_batch = n_ubatch = 512) runs on Self-Extend, then on off; after a rewind to
--decode-at tokens, each single-token decode step likewise. Both use the same attention path
(--flash-attn on or off) and are timed by selfextend_gguf.evaluate.timing's runners. Prints the
tokens/s of both and their ratio, and, for decode, the median of the per-step ratios.

    python scripts/bench_paired.py --prefill 32768 --decode-at 28672 --group-size 8 --json out.json
    python scripts/bench_paired.py --prefill 16384 --decode-at 12288 --flash-attn off --repeats 3

Memory is not measured here (bench_speed.py reads it from each process's llama.cpp log).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(model: str, n_prefill: int, n_decode_at: int, n_decode: int, threads: int, group_size: int,
            window: int, flash_attn: bool) -> dict:
    import numpy as np
    from selfextend_gguf.evaluate import methods

    def runner(method):
        return methods.make(method, model, n_prefill + n_decode + 16, n_threads=threads, flash_attn=flash_attn,
                            n_batch=512, verbose=False)

    extended, off = runner(f"exact-g{group_size}-w{window}"), runner("vanilla")
    tokens = np.random.default_rng(0).integers(100, 40000, size=n_prefill).tolist()

    def timed(run, tokens):
        began = time.perf_counter()
        run.decode(tokens, len(tokens) - 1)
        return time.perf_counter() - began

    prefill = {"self-extend": 0.0, "off": 0.0}
    for start in range(0, n_prefill, 512):
        batch = tokens[start:start + 512]
        prefill["self-extend"] += timed(extended, batch)
        prefill["off"] += timed(off, batch)

    steps = {"self-extend": [], "off": []}
    for run in (extended, off):
        run.forget_after(n_decode_at)  # cells after it are removed, as bench_speed.py does
    token = tokens[n_decode_at]
    for _ in range(n_decode):
        steps["self-extend"].append(timed(extended, [token]))
        steps["off"].append(timed(off, [token]))

    return dict(prefill_tps={k: n_prefill / s for k, s in prefill.items()},
                decode_tps={k: n_decode / sum(s) for k, s in steps.items()},
                decode_step_ratio=statistics.median(o / e for e, o in zip(steps["self-extend"], steps["off"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--prefill", type=int, default=16384)
    parser.add_argument("--decode-at", type=int, default=12288)
    parser.add_argument("--decode", type=int, default=32, help="decode steps to time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4, help="Self-Extend G")
    parser.add_argument("--window", type=int, default=1024, help="Self-Extend W")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the ratios reported are their medians")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.model is None:
        from selfextend_gguf.models import default_model_path
        args.model = str(default_model_path())

    runs = [measure(args.model, args.prefill, args.decode_at, args.decode, args.threads, args.group_size,
                    args.window, args.flash_attn == "on") for _ in range(args.repeats)]

    def ratio(run, key):
        return run[key]["self-extend"] / run[key]["off"]

    summary = dict(prefill_ratio=statistics.median(ratio(r, "prefill_tps") for r in runs),
                   decode_ratio=statistics.median(ratio(r, "decode_tps") for r in runs),
                   decode_step_ratio=statistics.median(r["decode_step_ratio"] for r in runs))
    print(f"prefill {args.prefill}, decode at {args.decode_at}, G={args.group_size} W={args.window}, "
          f"flash attention {args.flash_attn}, {args.threads} threads, median of {args.repeats}")
    for i, r in enumerate(runs):
        print(f"  run {i + 1}: prefill {r['prefill_tps']['self-extend']:.1f} vs {r['prefill_tps']['off']:.1f} tok/s, "
              f"decode {r['decode_tps']['self-extend']:.2f} vs {r['decode_tps']['off']:.2f} tok/s")
    print(f"Self-Extend vs off: prefill {summary['prefill_ratio']:.3f}x, decode {summary['decode_ratio']:.3f}x "
          f"(median step {summary['decode_step_ratio']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), summary=summary, runs=runs), f, indent=2)


if __name__ == "__main__":
    main()
