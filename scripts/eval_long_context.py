#!/usr/bin/env python3
"""Long-context evaluation (passkey, needle, perplexity, throughput): the command line of
selfextend_gguf.evaluate.command; --help lists the options.

    python scripts/eval_long_context.py --tasks passkey --methods exact-auto,vanilla,chunked \
        --lengths 16k --seeds 0 --out docs/long_context/passkey.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from selfextend_gguf.evaluate.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
