"""Where a prefill's time goes on Vulkan, per ggml op: Self-Extend against plain llama.cpp, on one attention path.

Each side runs in a child process with GGML_VK_PERF_LOGGER=1 (ggml-vulkan times every node): two prefills of
--tokens random tokens of the embedded SmolLM2 in batches of 512, every layer on the device. Prints the seconds
per op (summed over all nodes of the second prefill: the first one compiles the pipelines) of each side. Times
here include the logger's own syncs, so compare the two columns, not these totals with scripts/bench_paired.py's.
Run from the checkout with the README's .venv:

    SELFEXTEND_GGUF_LIB_PATH=$PWD/build/vulkan/bin GGML_VK_VISIBLE_DEVICES=0 python scripts/vulkan_op_times.py [--flash-attn off]
"""
import argparse
import collections
import os
import re
import subprocess
import sys

CHILD = """
import sys
from selfextend_gguf.evaluate import methods, timing
from selfextend_gguf.models import default_model_path
method, n, flash_attn = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
run = methods.make(method, str(default_model_path()), n + 64, n_threads=2, flash_attn=flash_attn, n_batch=512,
                   verbose=False, n_gpu_layers=-1)
tokens = timing.prompt_tokens(n, run.llm.n_vocab())
for timed in (False, True):
    run.forget_after(0)
    print(WARM if timed else "", file=sys.stderr, flush=True)
    for start in range(0, n, 512):
        batch = tokens[start:start + 512]
        run.decode(batch, len(batch) - 1)
"""
# the child prints this between its two prefills: the first one compiles the pipelines (lavapipe compiles on first
# use, inside the timed dispatches), and only the second one is counted
WARM = "--- second prefill ---"
LINE = re.compile(r"(.+?): (\d+) x [\d.e+]+ us = ([\d.e+]+) us")


def op_seconds(method: str, n_tokens: int, flash_attn: str, shapes: bool) -> dict:
    env = dict(os.environ, GGML_VK_PERF_LOGGER="1")
    done = subprocess.run([sys.executable, "-c", f"WARM = {WARM!r}\n" + CHILD, method, str(n_tokens), flash_attn],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    seconds = collections.Counter()
    for line in done.stderr.split(WARM, 1)[1].splitlines():
        m = LINE.match(line)
        if m:
            name = m.group(1).strip() if shapes else re.split(r"[ (]", m.group(1))[0]
            seconds[name] += float(m.group(3)) / 1e6
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="prefill length (default 4096)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--shapes", action="store_true", help="one line per op and shape (the logger's names)")
    args = parser.parse_args()
    if not os.environ.get("SELFEXTEND_GGUF_LIB_PATH"):
        sys.exit("set SELFEXTEND_GGUF_LIB_PATH to a Vulkan build's bin folder (e.g. $PWD/build/vulkan/bin)")
    extended = op_seconds(f"exact-g{args.group_size}-w{args.window}", args.tokens, args.flash_attn, args.shapes)
    plain = op_seconds("vanilla", args.tokens, args.flash_attn, args.shapes)
    print(f"prefill {args.tokens} tokens, flash attention {args.flash_attn}, every layer on the device: seconds per op")
    width = max(24, *(len(op) for op in set(extended) | set(plain)))
    print(f"{'op':{width}s} {'Self-Extend':>12s} {'plain':>8s}")
    for op in sorted(set(extended) | set(plain), key=lambda o: -max(extended[o], plain[o])):
        print(f"{op:{width}s} {extended[op]:12.2f} {plain[op]:8.2f}")
    print(f"{'total':{width}s} {sum(extended.values()):12.2f} {sum(plain.values()):8.2f}")


if __name__ == "__main__":
    main()
