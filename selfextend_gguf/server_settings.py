"""Command-line options of `selfextend-gguf serve` (argparse only: cheap to import).

The options most people need are flags; everything else llama-cpp-python's server accepts
(n_gpu_layers, chat_format, type_k, several models, ...) goes in a --config file, which has
llama-cpp-python's config file format plus `grp_attn_n` / `grp_attn_w` per model and
`state_dir` at the top level.
"""
from __future__ import annotations

import argparse

# {setting: flag}: the server options override a config file's; the model options belong in it
SERVER_OPTIONS = {"host": "--host", "port": "--port", "api_key": "--api-key", "state_dir": "--state-dir"}
MODEL_OPTIONS = {"model": "--model", "n_ctx": "--ctx", "grp_attn_n": "--grp-attn-n",
                 "grp_attn_w": "--grp-attn-w", "n_threads": "--threads", "verbose": "--verbose"}

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def group_size_arg(text: str) -> int | str:
    """--grp-attn-n: 'auto' or an integer >= 1."""
    if text == "auto":
        return text
    try:
        return positive_int_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {text!r}") from None


def positive_int_arg(text: str) -> int:
    """An integer >= 1 (the CLI and the server share these argument types)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `serve`. Every default is None so that serve() can tell what was given."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", "-m", metavar="PATH",
                       help="GGUF file to serve (default: the embedded SmolLM2-135M-Instruct)")
    model.add_argument("--ctx", "-c", dest="n_ctx", type=positive_int_arg, metavar="N",
                       help="context length in tokens, the longest prompt + completion (default: 2048)")
    model.add_argument("--grp-attn-n", dest="grp_attn_n", type=group_size_arg, metavar="G|auto",
                       help="Self-Extend group size: 'auto' (default) turns it on, with G and W picked "
                            "from --ctx, when --ctx is longer than the trained context; 1 = off")
    model.add_argument("--grp-attn-w", dest="grp_attn_w", type=positive_int_arg, metavar="W",
                       help="Self-Extend neighbor window (default: min(1024, trained context / 8))")
    model.add_argument("--threads", dest="n_threads", type=positive_int_arg, metavar="N",
                       help="threads for prompt processing and generation (default: all CPUs "
                            "and half of them)")
    model.add_argument("--verbose", action="store_const", const=True,
                       help="print llama.cpp's logs")
    server = parser.add_argument_group("server")
    server.add_argument("--host", help=f"address to listen on (default: {DEFAULT_HOST}, loopback only)")
    server.add_argument("--port", type=int, help=f"port to listen on (default: {DEFAULT_PORT})")
    server.add_argument("--api-key", dest="api_key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every request (401 otherwise)")
    server.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                        help="enable POST /v1/selfextend/state/{save,load}, which keep saved "
                             "context states in DIR (and nowhere else)")
    server.add_argument("--config", metavar="FILE",
                        help="JSON or YAML config file in llama-cpp-python's format (server settings "
                             "and a list of models, which may set grp_attn_n/grp_attn_w); "
                             "--host/--port/--api-key/--state-dir override it")
    return parser
