#!/usr/bin/env python3
"""Write a small random-weight GGUF for tests: the command line of selfextend_gguf.testing.tiny_gguf.

    python scripts/make_tiny_gguf.py OUT.gguf [--arch llama|qwen2|qwen3|gemma2|gemma3|phi2] --type f32|f16|q8_0 [--n-ctx-train 64] [--seed 0]
    python scripts/make_tiny_gguf.py OUT.gguf --shape smollm2|llama-1b --type q8_0   (speed runs)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from selfextend_gguf.testing.tiny_gguf import main  # noqa: E402

if __name__ == "__main__":
    main()
