"""`selfextend-gguf serve`: llama.cpp's own llama-server, built from the patched source, with exact
Self-Extend in every slot.

    selfextend-gguf serve                                   # the embedded model on 127.0.0.1:8080
    selfextend-gguf serve -m model.gguf --ctx 32768 --parallel 4 --api-key KEY
    selfextend-gguf serve -m model.gguf -- --flash-attn off # after --: any other llama-server flag

This module only decides llama-server's command line: the model (default: the embedded SmolLM2),
the context of each slot (default: twice the trained context), G and W (default: chosen for that
context by settings.decide, as the Python API decides them), loopback only. Then it becomes that
server (exec). Everything else is llama-server's: the OpenAI routes, continuous batching over
--parallel slots, prompt caching, the API key (401), 400 for a prompt past the slot's context,
/slots save and restore (--state-dir), /props with grp_attn_n and grp_attn_w.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import settings
from ._native import program_path
from .gguf_info import read_model_info

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", "-m", metavar="PATH",
                        help="GGUF file to serve (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", "-c", dest="n_ctx", type=settings.positive_int_arg, metavar="N",
                        help="context of each slot in tokens, the longest prompt + completion "
                             "(default: twice the model's trained context)")
    parser.add_argument("--parallel", "-np", type=settings.positive_int_arg, default=1, metavar="N",
                        help="slots answering at once, by continuous batching (default: 1)")
    parser.add_argument("--grp-attn-n", dest="grp_attn_n", type=settings.group_size_arg, default="auto", metavar="G|auto",
                        help="Self-Extend group size: 'auto' (default) turns it on, with G and W picked from "
                             "--ctx, when --ctx is longer than the trained context; 1 = off")
    parser.add_argument("--grp-attn-w", dest="grp_attn_w", type=settings.positive_int_arg, metavar="W",
                        help="Self-Extend neighbor window (default: min(1024, trained context / 8))")
    parser.add_argument("--threads", "-t", type=settings.positive_int_arg, metavar="N",
                        help="threads (default: llama-server's, the CPU's cores)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every request (401 otherwise)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where POST /slots/ID?action=save|restore keeps saved slots (llama-server's "
                             "--slot-save-path); unset: saving is off")
    parser.add_argument("--verbose", action="store_true", help="llama-server's verbose logs")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="anything after -- goes to llama-server as it is")
    return parser


def server_command(args: argparse.Namespace) -> list[str]:
    """llama-server's argv for these options. Raises ValueError (bad settings) or OSError (no model)."""
    if args.model is None:
        from .models import default_model_path
        args.model = str(default_model_path())
    info = read_model_info(args.model)
    n_ctx = args.n_ctx or 2 * info.n_ctx_train
    setting = settings.decide(info, args.grp_attn_n, args.grp_attn_w, n_ctx, spelling=settings.CLI, strict=True)
    command = [str(program_path("llama-server")), "--model", args.model,
               "--ctx-size", str(n_ctx * args.parallel), "--parallel", str(args.parallel),
               "--host", args.host, "--port", str(args.port)]
    if setting.enabled:
        command += ["--grp-attn-n", str(setting.group_size), "--grp-attn-w", str(setting.neighbor_window)]
    if args.threads:
        command += ["--threads", str(args.threads), "--threads-batch", str(args.threads)]
    if args.api_key:
        command += ["--api-key", args.api_key]
    if args.state_dir:
        command += ["--slot-save-path", args.state_dir]
    if args.verbose:
        command.append("--verbose")
    extra = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    return command + extra


def serve(args: argparse.Namespace) -> int:
    """Become llama-server (exec); returns only on bad settings (2)."""
    try:
        command = server_command(args)
        if args.state_dir:
            os.makedirs(args.state_dir, exist_ok=True)
    except (ValueError, OSError) as error:  # OSError: missing model file or program
        print(f"selfextend-gguf serve: error: {error}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not args.api_key:
        print(f"selfextend-gguf serve: warning: listening on {args.host} without --api-key: anyone who "
              "can reach it can use the model", file=sys.stderr)
    sys.stderr.flush()
    os.execv(command[0], command)
    return 1  # not reached
