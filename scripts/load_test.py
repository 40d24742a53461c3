"""Load test: llama.cpp's llama-server (`selfextend-gguf serve`) with Self-Extend on and off, and
llama-cpp-python's Python server, with 1, 2 and 4 concurrent clients, in one run.

For each server and each concurrency C the script starts the server on a free loopback port (the
native one with --parallel C: C slots, continuous batching; the Python one answers one request at a
time), sends one warm-up request, then --requests chat requests with distinct documents of about
--prompt-tokens tokens, C at a time, and reports requests/s and p50/p95 latency.

    python scripts/load_test.py                                  # SmolLM2, 8 requests per cell
    python scripts/load_test.py --requests 16 --concurrency 1,4 --servers native-on,python

The Python server is `python -m llama_cpp.server`, llama-cpp-python's own, on the same patched
library (which `import llama_cpp` loads), with Self-Extend off: it has no setting for it. It needs
llama-cpp-python's [server] extra, which selfextend-gguf does not install:
pip install "llama-cpp-python[server]==0.3.36".
Loopback only, bounded: at most 1000 requests, a timeout per request and --max-seconds per cell.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server command on a free loopback port, ready when `ready_path` answers 200; stop() ends it."""

    def __init__(self, command: list[str], ready_path: str, timeout: float = 180):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
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


def start(kind: str, args, concurrency: int) -> Server:
    if kind == "python":
        return Server([sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--n_ctx", str(args.ctx),
                       "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)], "/v1/models")
    group = ["--grp-attn-n", "1"] if kind == "native-off" else ["--grp-attn-n", str(args.grp_attn_n),
                                                               "--grp-attn-w", str(args.grp_attn_w)]
    return Server([sys.executable, "-m", "selfextend_gguf", "serve", "--model", args.model, "--ctx", str(args.ctx),
                   "--parallel", str(concurrency), "--threads", str(args.threads), *group], "/health")


def ask(client: httpx.Client, text: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"{text}\n\nWhich words appear most often? Answer briefly."}],
            "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return {"ok": False, "seconds": seconds, "error": f"{response.status_code} {response.text[:200]}"}
    usage = response.json()["usage"]
    return {"ok": True, "seconds": seconds, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


def measure(url: str, args, concurrency: int, n_words: int) -> dict:
    with httpx.Client(base_url=url, timeout=args.timeout) as client:
        warmup = ask(client, document(10_000, n_words), args.max_tokens)
        if not warmup["ok"]:
            raise SystemExit(f"the warm-up request failed: {warmup['error']}")
        deadline = time.monotonic() + args.max_seconds

        def one(i):
            if time.monotonic() > deadline:
                return {"ok": False, "seconds": 0.0, "error": "skipped: --max-seconds reached"}
            return ask(client, document(i + 1, n_words), args.max_tokens)

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    latencies = [r["seconds"] for r in ok]
    failures = [r["error"] for r in results if not r["ok"]]
    nan = float("nan")
    return {"ok": len(ok), "failed": len(failures), "first_error": failures[0] if failures else "",
            "rps": len(ok) / wall if wall else 0.0,
            "p50_s": percentile(latencies, 50) if ok else nan, "p95_s": percentile(latencies, 95) if ok else nan,
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok) / len(ok) if ok else 0,
            "completion_tokens": sum(r["completion_tokens"] for r in ok) / len(ok) if ok else 0}


def words_for(model: str, n_tokens: int) -> int:
    """How many words make a document of about n_tokens tokens with the model's tokenizer."""
    import llama_cpp  # the patched library, as every llama-cpp-python tool loads it

    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    count = len(vocab.tokenize(document(0, 500).encode(), add_bos=False))
    vocab.close()
    return max(1, round(500 * n_tokens / count))


LABELS = {"native-on": "llama-server, Self-Extend G={g} W={w}", "native-off": "llama-server, Self-Extend off",
          "python": "llama-cpp-python server (one at a time)"}


# what `python -m llama_cpp.server` imports beyond llama_cpp (llama-cpp-python's [server] extra)
PYTHON_SERVER_NEEDS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", type=int, default=4096, help="context per slot (default: 4096)")
    parser.add_argument("--grp-attn-n", type=int, default=4, help="Self-Extend G when on (default: 4)")
    parser.add_argument("--grp-attn-w", type=int, default=256,
                        help="Self-Extend W when on (default: 256, so ~1k-token prompts cross it)")
    parser.add_argument("--servers", default="native-on,native-off,python")
    parser.add_argument("--concurrency", default="1,2,4", help="clients at once, a list (default: 1,2,4)")
    parser.add_argument("--requests", type=int, default=8, help="requests per cell (default: 8)")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="about this many per document")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this, per cell")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    if not (1 <= args.requests <= 1000 and all(1 <= c <= 16 for c in levels)):
        parser.error("--requests must be 1..1000 and each concurrency 1..16")
    if unknown := set(servers) - set(LABELS):
        parser.error(f"unknown --servers {', '.join(sorted(unknown))}; choose from {', '.join(LABELS)}")
    if "python" in servers and any(importlib.util.find_spec(name) is None for name in PYTHON_SERVER_NEEDS):
        parser.error('--servers python needs llama-cpp-python\'s [server] extra: pip install '
                     '"llama-cpp-python[server]==0.3.36" (or leave python out of --servers)')

    if args.model is None:
        from selfextend_gguf.models import default_model_path
        args.model = str(default_model_path())
    n_words = words_for(args.model, args.prompt_tokens)  # the same documents for every cell
    rows = []
    for kind in servers:
        label = LABELS[kind].format(g=args.grp_attn_n, w=args.grp_attn_w)
        python_server = start(kind, args, 1) if kind == "python" else None  # one, for every concurrency
        for concurrency in levels:
            print(f"{label}, {concurrency} at a time ...", file=sys.stderr, flush=True)
            server = python_server or start(kind, args, concurrency)
            try:
                rows.append({"label": label, "concurrency": concurrency, **measure(server.url, args, concurrency, n_words)})
            finally:
                if server is not python_server:
                    server.stop()
        if python_server:
            python_server.stop()

    print(f"\n{args.requests} requests per cell, ~{args.prompt_tokens}-token prompts, {args.max_tokens} generated "
          f"tokens, {args.ctx} tokens per slot, {args.threads} threads\n")
    print("| server | clients | ok | req/s | p50 s | p95 s | mean prompt tok | mean completion tok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['concurrency']} | {r['ok']}/{r['ok'] + r['failed']} | {r['rps']:.3f} "
              f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['prompt_tokens']:.0f} | {r['completion_tokens']:.1f} |")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
