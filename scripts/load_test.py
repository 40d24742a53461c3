"""Load test of the server: N chat requests, C at a time, with Self-Extend on and off.

For each mode the script starts `python -m selfextend_gguf.server` on a free loopback port
(same model and --ctx; "on" adds --grp-attn-n/--grp-attn-w), sends one warm-up request, then
--requests requests with distinct documents of about --prompt-tokens tokens, --concurrency at a
time, and reports requests/s and latency percentiles. Then one more document is asked twice
(two questions): the second request reuses the cached document (prefix reuse).
The server answers one request at a time (llama-cpp-python's lock): concurrent requests queue.

    python scripts/load_test.py                                   # SmolLM2, 16 requests, 4 at a time
    python scripts/load_test.py --requests 32 --concurrency 8 --prompt-tokens 2000
    python scripts/load_test.py --url http://127.0.0.1:8000       # a running server, as it is

Loopback only, bounded: at most 1000 requests, a timeout per request and --max-seconds per mode.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WORDS = ("river stone lamp harbor copper violet ember orchard lantern meadow signal anchor "
         "granite willow beacon cobalt thistle ferry quarry saddle marble glacier pepper canyon "
         "falcon ribbon walnut cedar prism velvet tunnel compass").split()


def document(i: int, n_words: int) -> str:
    rng = random.Random(i)
    return f"Report {i}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Server:
    """`python -m selfextend_gguf.server` on a free loopback port, stopped by stop()."""

    def __init__(self, args: list[str], timeout: float = 120):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", "selfextend_gguf.server", *args,
                                         "--host", "127.0.0.1", "--port", str(port)],
                                        env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"the server did not start within {timeout} s")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.log.close()


def ask(client: httpx.Client, text: str, question: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"{text}\n\n{question}"}],
            "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        return {"ok": False, "seconds": seconds, "error": f"{response.status_code} {response.text[:200]}"}
    usage = response.json()["usage"]
    return {"ok": True, "seconds": seconds, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


def words_for(client: httpx.Client, n_tokens: int) -> int:
    """How many words make a document of about n_tokens tokens with this model's tokenizer."""
    sample = document(0, 500)
    count = len(client.post("/v1/tokenize", json={"input": sample}).json()["tokens"])
    return max(1, round(500 * n_tokens / count))


def run(url: str, args, label: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as client:
        n_words = words_for(client, args.prompt_tokens)
        question = "Which words appear most often in the report? Answer briefly."
        warmup = ask(client, document(10_000, n_words), question, args.max_tokens)
        if not warmup["ok"]:
            raise SystemExit(f"{label}: the warm-up request failed: {warmup['error']}")

        deadline = time.monotonic() + args.max_seconds
        results = []
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            def one(i):
                if time.monotonic() > deadline:
                    return {"ok": False, "seconds": 0.0, "error": "skipped: --max-seconds reached"}
                return ask(client, document(i + 1, n_words), question, args.max_tokens)
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start

        # prefix reuse: a new document, then the same document with another question
        evaluated = lambda: client.get("/v1/selfextend").json()["tokens_evaluated"]  # noqa: E731
        before = evaluated()
        cold = ask(client, document(20_000, n_words), question, args.max_tokens)
        middle = evaluated()
        warm = ask(client, document(20_000, n_words), "Which word comes first?", args.max_tokens)
        cold["evaluated"], warm["evaluated"] = middle - before, evaluated() - middle

    ok = [r for r in results if r["ok"]]
    latencies = [r["seconds"] for r in ok]
    failures = [r["error"] for r in results if not r["ok"]]
    return {"label": label, "ok": len(ok), "failed": len(failures), "first_error": failures[0] if failures else "",
            "wall_s": wall, "rps": len(ok) / wall if wall else 0.0,
            "p50_s": percentile(latencies, 50) if ok else float("nan"),
            "p95_s": percentile(latencies, 95) if ok else float("nan"),
            "mean_s": statistics.fmean(latencies) if ok else float("nan"),
            "prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else 0,
            "completion_tokens": statistics.fmean(r["completion_tokens"] for r in ok) if ok else 0,
            "cold": cold, "warm": warm}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on loopback (measured once, as configured)")
    parser.add_argument("--api-key", help="the server's --api-key, with --url")
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", type=int, default=4096, help="server --ctx in both modes (default: 4096)")
    parser.add_argument("--grp-attn-n", default="4", help="Self-Extend G in the 'on' mode (default: 4)")
    parser.add_argument("--grp-attn-w", type=int, default=256,
                        help="Self-Extend W in the 'on' mode (default: 256, so ~1k-token prompts cross it)")
    parser.add_argument("--modes", default="off,on", help="which of off,on to run (default: off,on)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="about this many per document")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this, per mode")
    args = parser.parse_args(argv)
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 64):
        parser.error("--requests must be 1..1000 and --concurrency 1..64")

    rows = []
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        rows.append(run(args.url.rstrip("/"), args, "as configured"))
    else:
        base = ["--ctx", str(args.ctx)] + (["--model", args.model] if args.model else [])
        modes = {"off": base + ["--grp-attn-n", "1"],
                 "on": base + ["--grp-attn-n", args.grp_attn_n, "--grp-attn-w", str(args.grp_attn_w)]}
        for mode in args.modes.split(","):
            label = "Self-Extend off" if mode == "off" else f"Self-Extend G={args.grp_attn_n} W={args.grp_attn_w}"
            print(f"{label}: starting the server ...", file=sys.stderr, flush=True)
            server = Server(modes[mode])
            try:
                rows.append(run(server.url, args, label))
            finally:
                server.stop()

    print(f"\n{args.requests} requests, {args.concurrency} at a time, ~{args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} generated tokens, n_ctx {args.ctx}\n")
    print("| mode | ok | failed | req/s | p50 s | p95 s | mean prompt tok | mean completion tok "
          "| same document again: s (tokens evaluated), cold / warm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['ok']} | {r['failed']} | {r['rps']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} "
              f"| {r['prompt_tokens']:.0f} | {r['completion_tokens']:.1f} | {r['cold']['seconds']:.2f} "
              f"({r['cold']['evaluated']}) / {r['warm']['seconds']:.2f} ({r['warm']['evaluated']}) |")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
