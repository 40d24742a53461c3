"""The one way prefill and decode are timed: the evaluation's throughput task and
scripts/bench_speed.py both call these, on a methods.Runner (llama_decode in batches of n_batch,
as llama.cpp's own tools read a prompt).

    prompt_tokens(n, n_vocab)      the prompt every speed script reads: n seeded random token ids
    read_batches(runner, tokens)   each batch of the prompt, timed: prefill tokens/s at its depth
    decode_steps(runner, token, n) n greedy single-token steps, timed: decode tokens/s

(scripts/load_test.py times whole HTTP requests to a server instead: latency and requests/s.)
"""
from __future__ import annotations

import time


def prompt_tokens(n: int, n_vocab: int = 49152) -> list[int]:
    """n token ids, the same for every run (seed 0): from 100 to 40,000 (SmolLM2's vocabulary is 49,152), within
    a smaller vocabulary's upper half."""
    import numpy as np
    return np.random.default_rng(0).integers(min(100, n_vocab // 2), min(40000, n_vocab), size=n).tolist()


def read_batches(runner, tokens: list) -> tuple[list[dict], int]:
    """Read tokens after what the runner holds, a batch of runner.n_batch at a time, timing each.
    Returns ([{"depth": tokens cached before the batch, "n": its size, "seconds": ...}], the greedy
    token that follows the last batch)."""
    timed, token = [], None
    for start in range(0, len(tokens), runner.n_batch):
        chunk = tokens[start:start + runner.n_batch]
        depth = len(runner.cached)
        began = time.perf_counter()
        token = int(runner.decode(chunk, len(chunk) - 1)[-1].argmax())
        timed.append({"depth": depth, "n": len(chunk), "seconds": time.perf_counter() - began})
    return timed, token


def decode_steps(runner, token: int, n: int) -> tuple[float, int]:
    """n greedy single-token steps from token; returns (seconds, the token after them)."""
    began = time.perf_counter()
    for _ in range(n):
        token = int(runner.decode([token], 0)[-1].argmax())
    return time.perf_counter() - began, token


def tokens_per_second(timed: list[dict]) -> float:
    return sum(t["n"] for t in timed) / sum(t["seconds"] for t in timed)
