"""Running the `selfextend-gguf` command as a user does, for the tests: a child process of this
Python, with this checkout importable and a plain terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def cli_env() -> dict:
    """os.environ (SELFEXTEND_GGUF_LIB_PATH included, if set) with this checkout importable, and a
    plain terminal: TERM=dumb keeps prompt_toolkit and rich free of cursor codes."""
    env = dict(os.environ, TERM="dumb", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="200", NO_COLOR="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def run_cli(*args, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m selfextend_gguf ARGS` with stdin; its exit code and text output."""
    return subprocess.run([sys.executable, "-m", "selfextend_gguf", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)
