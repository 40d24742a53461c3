"""The pass key through llama.cpp's own llama-server: SmolLM2 (trained on 8,192 tokens) reads a
document of about 12,000 tokens (1.5x) with exact Self-Extend and gives the key back.

    python scripts/server_passkey.py                  # ~12k tokens, key 71432 at 50 %
    python scripts/server_passkey.py --tokens 14000 --depth 0.25 --key 90210

It starts `selfextend-gguf serve` (the embedded model, G and W chosen for the slot) on a free
loopback port, sends the document and "What is the pass key? The pass key is" to /completion
(no chat template: a 135M model needs the raw prompt), and prints the answer, the timings and
whether the key is in it (exit 0) or not (exit 1).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from load_test import Server  # noqa: E402  (the same loopback server runner)

QUESTION = "What is the pass key? The pass key is"


def long_document(n_tokens: int, key: int, depth: float) -> str:
    spec = importlib.util.spec_from_file_location("make_long_document", ROOT / "examples" / "make_long_document.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.long_document(n_tokens, key, depth)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=12_000, help="document size, about (default 12000)")
    parser.add_argument("--key", type=int, default=71432)
    parser.add_argument("--depth", type=float, default=0.5, help="where the key is, 0 to 1 (default 0.5)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    prompt = long_document(args.tokens, args.key, args.depth) + QUESTION
    ctx = args.tokens + 512  # the document, the question and room to answer
    server = Server([sys.executable, "-m", "selfextend_gguf", "serve", "--ctx", str(ctx), "--threads",
                     str(args.threads)], "/health", timeout=300)
    try:
        props = httpx.get(f"{server.url}/props", timeout=60).json()
        response = httpx.post(f"{server.url}/completion", timeout=3600, json={
            "prompt": prompt, "n_predict": 12, "temperature": 0, "cache_prompt": False})
        response.raise_for_status()
        answer = response.json()
    finally:
        server.stop()
    timings = answer["timings"]
    found = str(args.key) in answer["content"]
    print(f"llama-server, Self-Extend G={props['grp_attn_n']} W={props['grp_attn_w']}, slot context "
          f"{props['default_generation_settings']['n_ctx']} tokens")
    print(f"read {timings['prompt_n']} tokens in {timings['prompt_ms'] / 1000:.1f} s "
          f"({timings['prompt_per_second']:.1f} tokens/s); answer {answer['content']!r}")
    print(f"pass key {args.key}: {'found' if found else 'NOT found'}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
