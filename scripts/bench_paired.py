"""Self-Extend against plain llama.cpp in one process, their work interleaved: speed ratios that a busy
spell of the machine cannot skew.

scripts/bench_speed.py measures each configuration in its own process, one after the other; on a
shared 2-core machine a single run of it can land one side in a quiet minute and the other in a busy
one (its 32k decode read 0.47x that way). Here both contexts live in one process and take turns:
each prefill batch (n_batch = n_ubatch = --batch, 512 by default) runs on Self-Extend, then on off; after a rewind to
--decode-at tokens, each single-token decode step likewise. Both use the same attention path
(--flash-attn on or off) and are timed by selfextend_gguf.evaluate.timing's runners. Prints the
tokens/s of both and their ratio, and, for decode, the median of the per-step ratios; --json also keeps
every prefill batch's time on each side (where along the context a gap grows).

The first step after the rewind is timed on its own and left out of decode's tokens/s: it carries the
rewind's work, not decode's (plain llama.cpp: a graph for one token in place of the prefill's; Self-Extend
too, and the cells that re-enter the neighbor window rotated back where the rewind is deeper than the ring
of normal copies). Its times are printed next to decode's, like llama-bench's warm-up run.

--baseline other-path pairs Self-Extend on --flash-attn's path against Self-Extend on the other path
instead of plain llama.cpp: which attention path is faster for Self-Extend (the defaults' question).

    python scripts/bench_paired.py --prefill 32768 --decode-at 28672 --group-size 8 --json out.json
    python scripts/bench_paired.py --prefill 16384 --decode-at 12288 --flash-attn off --repeats 3
    python scripts/bench_paired.py --prefill 12288 --decode-at 12032 --flash-attn on --baseline other-path
    SELFEXTEND_GGUF_LIB_PATH=build/vulkan/bin GGML_VK_VISIBLE_DEVICES=0 \
        python scripts/bench_paired.py --prefill 4096 --decode-at 3072 --window 512 --n-gpu-layers -1

--batch smaller than 512 keeps plain llama.cpp on the device where a 512-token batch's scores would not fit a
Vulkan descriptor: without flash attention its scores [n_kv, n_batch, n_head] (F32) are one tensor, and
ggml-vulkan refuses a tensor over the device's maxStorageBufferRange (lavapipe: 128 MiB, reached by SmolLM2's 9
heads past 7,281 cells of context), so llama.cpp computes that layer's attention on the CPU. Self-Extend's score
blocks are a third of that size (its heads in chunks) and stay on the device: the two would no longer run the
same path (docs/backends.md).

    SELFEXTEND_GGUF_LIB_PATH=build/vulkan/bin GGML_VK_VISIBLE_DEVICES=0 \
        python scripts/bench_paired.py --prefill 8192 --decode-at 7168 --n-gpu-layers -1 --flash-attn off --batch 256

Memory is not measured here (bench_speed.py reads it from each process's llama.cpp log).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(model: str, n_prefill: int, n_decode_at: int, n_decode: int, threads: int, group_size: int,
            window: int, flash_attn: bool, baseline: str = "off", n_gpu_layers: int = 0, n_batch: int = 512) -> dict:
    """Tokens/s of Self-Extend and of the baseline, keyed "self-extend" and BASELINES[baseline]."""
    from selfextend_gguf.evaluate import methods, timing

    def runner(method, flash_attn):
        return methods.make(method, model, n_prefill + n_decode + 16, n_threads=threads, flash_attn=flash_attn,
                            n_batch=n_batch, verbose=False, n_gpu_layers=n_gpu_layers)

    exact = f"exact-g{group_size}-w{window}"
    extended = runner(exact, flash_attn)
    off = runner("vanilla", flash_attn) if baseline == "off" else runner(exact, not flash_attn)
    name = BASELINES[baseline]
    tokens = timing.prompt_tokens(n_prefill, extended.llm.n_vocab())

    def timed(run, tokens):
        began = time.perf_counter()
        run.decode(tokens, len(tokens) - 1)
        return time.perf_counter() - began

    batches = {"self-extend": [], name: []}  # seconds per batch: where along the context a gap grows
    for start in range(0, n_prefill, n_batch):
        batch = tokens[start:start + n_batch]
        batches["self-extend"].append(timed(extended, batch))
        batches[name].append(timed(off, batch))

    steps = {"self-extend": [], name: []}
    for run in (extended, off):
        run.forget_after(n_decode_at)  # cells after it are removed, as bench_speed.py does
    token = tokens[n_decode_at]
    first_step = {"self-extend": timed(extended, [token]), name: timed(off, [token])}  # the rewind's step
    for _ in range(n_decode):
        steps["self-extend"].append(timed(extended, [token]))
        steps[name].append(timed(off, [token]))

    return dict(prefill_tps={k: n_prefill / sum(s) for k, s in batches.items()},
                prefill_batches_ms={k: [round(1000 * t, 2) for t in s] for k, s in batches.items()},
                first_step_ms={k: round(1000 * t, 2) for k, t in first_step.items()},
                decode_tps={k: n_decode / sum(s) for k, s in steps.items()},
                decode_step_ratio=statistics.median(o / e for e, o in zip(steps["self-extend"], steps[name])),
                decode_steps_ms={k: [round(1000 * t, 2) for t in s] for k, s in steps.items()})


# --baseline -> what the other context is
BASELINES = {"off": "off", "other-path": "self-extend on the other path"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--prefill", type=int, default=16384)
    parser.add_argument("--decode-at", type=int, default=12288)
    parser.add_argument("--decode", type=int, default=32, help="decode steps to time, after the first one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512, help="tokens per prefill batch (n_batch = n_ubatch)")
    parser.add_argument("--group-size", type=int, default=4, help="Self-Extend G")
    parser.add_argument("--window", type=int, default=1024, help="Self-Extend W")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--baseline", choices=sorted(BASELINES), default="off",
                        help="off: plain llama.cpp on the same path; other-path: Self-Extend on the other path")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the ratios reported are their medians")
    parser.add_argument("--n-gpu-layers", type=int, default=0,
                        help="layers on the GPU (-1: all), for a build with a GPU backend (SELFEXTEND_GGUF_LIB_PATH)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not 0 <= args.decode_at < args.prefill:
        parser.error(f"--decode-at {args.decode_at} must be below --prefill {args.prefill}: decode steps start "
                     "from a context rewound to it")
    if args.batch < 1:
        parser.error(f"--batch {args.batch} must be at least 1")
    if args.model is None:
        from selfextend_gguf.models import default_model_path
        args.model = str(default_model_path())

    name = BASELINES[args.baseline]
    print(f"prefill {args.prefill}, decode at {args.decode_at}, G={args.group_size} W={args.window}, "
          f"flash attention {args.flash_attn}, {args.threads} threads, batches of {args.batch}, median of {args.repeats}",
          flush=True)
    runs = []
    for i in range(args.repeats):  # each run's line as it ends: a lavapipe run at 8k takes half an hour
        r = measure(args.model, args.prefill, args.decode_at, args.decode, args.threads, args.group_size,
                    args.window, args.flash_attn == "on", args.baseline, args.n_gpu_layers, args.batch)
        runs.append(r)
        print(f"  run {i + 1}: prefill {r['prefill_tps']['self-extend']:.1f} vs {r['prefill_tps'][name]:.1f} tok/s, "
              f"decode {r['decode_tps']['self-extend']:.2f} vs {r['decode_tps'][name]:.2f} tok/s, first step after "
              f"the rewind {r['first_step_ms']['self-extend']:.1f} vs {r['first_step_ms'][name]:.1f} ms", flush=True)

    def ratio(run, key):
        return run[key]["self-extend"] / run[key][name]

    summary = dict(prefill_ratio=statistics.median(ratio(r, "prefill_tps") for r in runs),
                   decode_ratio=statistics.median(ratio(r, "decode_tps") for r in runs),
                   decode_step_ratio=statistics.median(r["decode_step_ratio"] for r in runs))
    print(f"Self-Extend vs {name}: prefill {summary['prefill_ratio']:.3f}x, decode {summary['decode_ratio']:.3f}x "
          f"(median step {summary['decode_step_ratio']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), summary=summary, runs=runs), f, indent=2)


if __name__ == "__main__":
    main()
