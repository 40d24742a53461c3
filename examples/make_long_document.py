#!/usr/bin/env python3
"""Write a long text with a pass key buried in the middle: the README's main-job example.

    python examples/make_long_document.py long.txt            # ~12,000 tokens for SmolLM2
    selfextend-gguf run --doc long.txt --raw -p "What is the pass key? The pass key is"
    python examples/make_long_document.py long.pdf            # the same text as a PDF, 48 lines a page

The text follows the pass key test of the Self-Extend paper (LongLM, arXiv 2401.01325): an
instruction, many repeats of the same irrelevant sentences, and one sentence that matters.
At the default size it is about 1.5 times the 8,192 tokens SmolLM2-135M-Instruct was trained
on: without Self-Extend the model cannot read it, with Self-Extend it finds the key.
"""
import argparse
from pathlib import Path

LINES_PER_PDF_PAGE = 48  # 12 pt Helvetica, 14 pt apart, on a US Letter page

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
FILLER_TOKENS = 25  # SmolLM2's tokenizer; about the same for most BPE vocabularies
FACT = "The pass key is {key}. Remember it. {key} is the pass key.\n"


def long_document(n_tokens: int = 12_000, key: int = 71432, depth: float = 0.5) -> str:
    """About n_tokens tokens of filler with the pass key at `depth` (0 = start, 1 = end)."""
    n_fillers = max(2, n_tokens // FILLER_TOKENS)
    before = round(n_fillers * depth)
    return INSTRUCTION + FILLER * before + FACT.format(key=key) + FILLER * (n_fillers - before)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the file to write: text, or a PDF if it ends in .pdf")
    parser.add_argument("--tokens", type=int, default=12_000, help="about how many tokens (default 12000)")
    parser.add_argument("--key", type=int, default=71432, help="the pass key (default 71432)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the key is, 0 to 1 (default 0.5)")
    args = parser.parse_args(argv)
    text = long_document(args.tokens, args.key, args.depth)
    if args.output.suffix.lower() == ".pdf":
        from selfextend_gguf.testing.documents import make_pdf
        lines = text.splitlines()
        pages = ["\n".join(lines[i:i + LINES_PER_PDF_PAGE]) for i in range(0, len(lines), LINES_PER_PDF_PAGE)]
        args.output.write_bytes(make_pdf(pages))
    else:
        args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}: {len(text):,} characters, about {args.tokens:,} tokens, "
          f"pass key {args.key} at {args.depth:.0%}")


if __name__ == "__main__":
    main()
