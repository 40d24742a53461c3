"""Speed and memory of Self-Extend against plain llama.cpp, measured in one run.

For each configuration, in its own process (one libllama per process, fresh caches):
  prefill  - time to evaluate a prompt of --prefill tokens (n_batch = n_ubatch = 512)
  decode   - tokens/s of single-token steps at a filled context of --decode-at tokens
  (both timed by selfextend_gguf.evaluate.timing, as the evaluation's throughput task times them)
  memory   - KV cache size and compute buffer size, as llama.cpp reports them

Configurations: Self-Extend on (--group-size G, --window W; 4 and 1024 by default) and off, each with flash attention off and on. Prints a
Markdown table of ratios against off on the same attention path (the same flash attention
setting), and against off without flash attention. Usage:

    python scripts/bench_speed.py                      # SmolLM2, 16k prefill, decode at 12k, 2 threads
    python scripts/bench_speed.py --prefill 2048 --decode-at 1536 --json out.json
    python scripts/bench_speed.py --configs "self-extend, flash attn" "off, flash attn"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

CONFIGS = {
    "self-extend": dict(self_extend=True, flash_attn=False),
    "off": dict(self_extend=False, flash_attn=False),
    "self-extend, flash attn": dict(self_extend=True, flash_attn=True),
    "off, flash attn": dict(self_extend=False, flash_attn=True),
}


def baseline(name: str) -> str:
    """Off on the same attention path."""
    return "off, flash attn" if CONFIGS[name]["flash_attn"] else "off"


def measure(model: str, config: dict, n_prefill: int, n_decode_at: int, n_decode: int, threads: int,
            window: int, group_size: int, n_gpu_layers: int) -> dict:
    """Runs inside a child process (see main)."""
    from selfextend_gguf.evaluate import methods, timing  # the evaluation's way of timing

    method = f"exact-g{group_size}-w{window}" if config["self_extend"] else "vanilla"
    runner = methods.make(method, model, n_prefill + n_decode + 16, n_threads=threads,
                          flash_attn=config["flash_attn"], n_batch=512, verbose=True, n_gpu_layers=n_gpu_layers)
    tokens = timing.prompt_tokens(n_prefill, runner.llm.n_vocab())
    batches, _ = timing.read_batches(runner, tokens)
    runner.forget_after(n_decode_at)  # rewind to the decode length (cells after it are removed)
    decode_s, _ = timing.decode_steps(runner, tokens[n_decode_at], n_decode)
    return dict(prefill_tps=timing.tokens_per_second(batches), decode_tps=n_decode / decode_s)


def parse_memory(log: str) -> dict:
    """KV cache and compute buffer sizes (MiB) from llama.cpp's log; the last reserve counts, on the
    GPU (CUDA0) where there is one, else on the CPU."""
    kv = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)
    compute = (re.findall(r"CUDA0 compute buffer size = +([\d.]+) MiB", log)
               or re.findall(r"CPU compute buffer size = +([\d.]+) MiB", log))
    return dict(kv_mib=float(kv[-1]) if kv else None, compute_mib=float(compute[-1]) if compute else None)


def run_child(args, name: str) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", args.model, "--prefill", str(args.prefill),
               "--decode-at", str(args.decode_at), "--decode", str(args.decode), "--threads", str(args.threads),
               "--window", str(args.window), "--group-size", str(args.group_size),
               "--n-gpu-layers", str(args.n_gpu_layers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(parse_memory(done.stderr))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--prefill", type=int, default=16384)
    parser.add_argument("--decode-at", type=int, default=12288)
    parser.add_argument("--decode", type=int, default=64, help="decode steps to time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=1024, help="Self-Extend W")
    parser.add_argument("--group-size", type=int, default=4, help="Self-Extend G")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp's n_gpu_layers (-1: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every configuration this many times, interleaved, and report the median")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to measure (each with its baseline)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from selfextend_gguf.models import default_model_path
        args.model = str(default_model_path())

    if args.child:
        print(json.dumps(measure(args.model, CONFIGS[args.child], args.prefill, args.decode_at, args.decode,
                                 args.threads, args.window, args.group_size, args.n_gpu_layers)))
        return

    names = [name for name in CONFIGS if name in args.configs or name in map(baseline, args.configs)]
    runs = {name: [] for name in names}
    for repeat in range(args.repeats):  # interleaved, so that a busy spell hurts every configuration
        for name in names:
            print(f"measuring {name} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            runs[name].append(run_child(args, name))
    results = {}
    for name, measured in runs.items():
        results[name] = dict(measured[0], runs=measured)
        for key in ("prefill_tps", "decode_tps"):
            results[name][key] = statistics.median(r[key] for r in measured)
    print(f"\n{os.path.basename(args.model)}, {args.threads} threads, prefill {args.prefill} tokens, "
          f"decode at {args.decode_at} tokens, Self-Extend G={args.group_size} W={args.window}, "
          f"median of {args.repeats}\n")
    print("| configuration | prefill tok/s | decode tok/s | KV MiB | compute MiB "
          "| prefill vs off, same path | decode vs off, same path | KV vs off | compute vs off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        base = results[baseline(name)]
        print(f"| {name} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {r['kv_mib']} | {r['compute_mib']} | "
              f"{r['prefill_tps'] / base['prefill_tps']:.2f}x | {r['decode_tps'] / base['decode_tps']:.2f}x | "
              f"{r['kv_mib'] / base['kv_mib']:.2f}x | {r['compute_mib'] / base['compute_mib']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
