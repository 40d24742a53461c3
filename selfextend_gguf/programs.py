"""The `llama-server`, `llama-cli` and `llama-completion` commands of this package: llama.cpp's own
programs, built from the patched source (exact Self-Extend with --grp-attn-n / --grp-attn-w).
Each command becomes the program it names (exec), with the same arguments."""
from __future__ import annotations

import os
import sys

from ._native import program_path


def _run(name: str) -> int:
    try:
        path = program_path(name)
    except FileNotFoundError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    os.execv(path, [name, *sys.argv[1:]])
    return 1  # not reached


def llama_server() -> int:
    return _run("llama-server")


def llama_cli() -> int:
    return _run("llama-cli")


def llama_completion() -> int:
    return _run("llama-completion")
