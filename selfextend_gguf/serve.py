"""`selfextend-gguf serve`: llama.cpp's own llama-server, built from the patched source, with exact
Self-Extend in every slot.

    selfextend-gguf serve                                   # the embedded model on 127.0.0.1:8080
    selfextend-gguf serve -m model.gguf --ctx 32768 --parallel 4 --api-key KEY
    selfextend-gguf serve -m model.gguf -- --flash-attn off # after --: any other llama-server flag
    selfextend-gguf serve --doc book.pdf                    # every slot starts with the book read

This module decides llama-server's command line: the model (default: the embedded SmolLM2), the
context of each slot (default: twice the trained context; with --doc, the documents plus room to
answer, as chat sizes it), G and W (chosen for that context by settings.decide), loopback only, and
the page at / (selfextend_gguf/web/index.html, llama-server's --path). Without --doc it becomes that
server (exec). With --doc it starts the server as a child, waits for /health, and has every slot
read the documents once (a one-token answer to the conversation's first message, kept by the prompt
cache), so that each question evaluates only its own tokens. The page reads documents.json, written
next to it: each document's name, kind, pages and tokens, and the text every conversation starts
with. Everything else is llama-server's: the OpenAI routes, continuous batching over --parallel
slots, prompt caching, the API key (401), 400 for a prompt past the slot's context, /slots save and
restore (--state-dir), /props with grp_attn_n and grp_attn_w.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import settings
from ._native import program_path
from .documents import Document, documents_text, load_documents
from .gguf_info import read_model_info

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WEB_PAGE = Path(__file__).parent / "web" / "index.html"   # package data: the page served at /
DOCUMENTS_FILE = "documents.json"                         # written next to the page by serve --doc
WARM_UP_QUESTION = "?"    # the question of the warm-up request; only the documents before it are kept
READY_TIMEOUT = 600       # seconds llama-server may take to load the model


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
    parser.add_argument("--doc", "-d", action="extend", nargs="+", default=[], metavar="FILE",
                        help="documents every slot reads once at the start, as chat and run read them (text, "
                             "Markdown, PDF, EPUB, HTML, DOCX, folders); --ctx defaults to them plus room to answer")
    parser.add_argument("--verbose", action="store_true", help="llama-server's verbose logs")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="anything after -- goes to llama-server as it is")
    return parser


@dataclass
class ServedDocuments:
    """What serve --doc hands every client (documents.json) and evaluates in every slot."""
    documents: list[Document]
    tokens: list[int]          # each document's tokens
    prompt_tokens: int         # the first message with the documents, in the chat template

    def first_message(self) -> dict:
        from .chat import first_message  # loads llama.cpp; only serve --doc needs it
        return first_message(self.documents, WARM_UP_QUESTION)

    def listing(self) -> dict:
        """documents.json: the page lists the documents and starts every conversation with `text`."""
        return {"documents": [{"name": doc.name, "kind": doc.kind, "pages": doc.sections,
                               "pages_name": doc.sections_name, "tokens": tokens}
                              for doc, tokens in zip(self.documents, self.tokens)],
                "prompt_tokens": self.prompt_tokens, "text": documents_text(self.documents)}


def slot_plan(args: argparse.Namespace, info) -> tuple[int, settings.SelfExtend, ServedDocuments | None]:
    """The context of each slot, G and W, and the documents (--doc), read and counted.
    Raises ValueError (bad settings, unreadable or too long documents) or OSError."""
    if not args.doc:
        n_ctx = args.n_ctx or 2 * info.n_ctx_train
        return n_ctx, settings.decide(info, args.grp_attn_n, args.grp_attn_w, n_ctx, spelling=settings.CLI,
                                      strict=True), None
    from . import chat  # loads llama.cpp: the vocabulary counts the tokens
    from ._native import LlamaLogCapture
    documents = load_documents(args.doc)
    if not args.verbose:
        LlamaLogCapture().install()
    n_prompt, per_document, _ = chat.size_prompt(info, documents, raw=None, each_document=True)
    plan = chat.plan_for_prompt(n_prompt, chat.CHAT_ROOM, info, n_ctx=args.n_ctx, grp_attn_n=args.grp_attn_n,
                                grp_attn_w=args.grp_attn_w)
    return plan.n_ctx, plan.self_extend, ServedDocuments(documents, per_document, n_prompt)


def server_command(args: argparse.Namespace, web_dir: Path = WEB_PAGE.parent) -> list[str]:
    """llama-server's argv for these options (the page from web_dir). Raises ValueError (bad settings,
    documents) or OSError (no model). Sets args.documents (a ServedDocuments, or None)."""
    if args.model is None:
        from .models import default_model_path
        args.model = str(default_model_path())
    info = read_model_info(args.model)
    n_ctx, setting, args.documents = slot_plan(args, info)
    command = [str(program_path("llama-server")), "--model", args.model,
               "--ctx-size", str(n_ctx * args.parallel), "--parallel", str(args.parallel),
               "--host", args.host, "--port", str(args.port), "--path", str(web_dir)]
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
    """Become llama-server (exec), or with --doc run it as a child (see serve_documents).
    Returns 2 on bad settings or documents, 1 when the server fails."""
    web_dir = Path(tempfile.mkdtemp(prefix="selfextend-gguf-web-")) if args.doc else WEB_PAGE.parent
    try:
        try:
            command = server_command(args, web_dir)
            if args.state_dir:
                os.makedirs(args.state_dir, exist_ok=True)
        except (ValueError, OSError) as error:  # OSError: missing model file or program
            return fail(str(error), 2)
        if args.host not in LOOPBACK and not args.api_key:
            print(f"selfextend-gguf serve: warning: listening on {args.host} without --api-key: anyone who "
                  "can reach it can use the model", file=sys.stderr)
        sys.stderr.flush()
        if not args.doc:
            os.execv(command[0], command)
        shutil.copy(WEB_PAGE, web_dir)
        (web_dir / DOCUMENTS_FILE).write_text(json.dumps(args.documents.listing()))
        return serve_documents(command, args)
    finally:
        if args.doc:
            shutil.rmtree(web_dir, ignore_errors=True)


def fail(message: str, code: int) -> int:
    print(f"selfextend-gguf serve: error: {message}", file=sys.stderr)
    return code


def serve_documents(command: list[str], args: argparse.Namespace) -> int:
    """Run llama-server as a child, have every slot read the documents, then wait for it to end.
    Ctrl-C (or SIGTERM) stops the child and returns after it has ended."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the child
    child = subprocess.Popen(command)
    try:
        url = f"http://{connect_host(args.host)}:{args.port}"
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            wait_until_ready(child, url)
            read_documents_into_slots(url, headers, args.documents, args.parallel)
        except ServerFailed as error:
            return fail(str(error), 1)
        print(f"selfextend-gguf serve: ready: open {url}/ (Ctrl-C stops the server)", file=sys.stderr, flush=True)
        return child.wait()
    finally:
        stop(child)


class ServerFailed(RuntimeError):
    """llama-server ended, or did not answer as it should, before it was ready."""


def connect_host(host: str) -> str:
    """Where this process reaches a server listening on `host`."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def wait_until_ready(child: subprocess.Popen, url: str) -> None:
    """Until /health answers 200 (it answers 503 while the model loads)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise ServerFailed(f"llama-server exited with status {child.returncode} before it was ready "
                               "(its messages are above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ServerFailed(f"llama-server did not answer {url}/health within {READY_TIMEOUT} s")


def read_documents_into_slots(url: str, headers: dict, documents: ServedDocuments, n_slots: int) -> None:
    """Each slot evaluates the conversation's first message (documents, then WARM_UP_QUESTION) and
    answers one token; its prompt cache keeps the tokens, and a question shares all of them up to
    the question. One slot after the other: the slots share the CPU anyway."""
    body = {"messages": [documents.first_message()], "max_tokens": 1, "temperature": 0, "cache_prompt": True}
    for slot in range(n_slots):
        print(f"selfextend-gguf serve: slot {slot}: reading the documents ({documents.prompt_tokens:,} tokens)",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        request = urllib.request.Request(f"{url}/v1/chat/completions", method="POST",
                                         data=json.dumps({**body, "id_slot": slot}).encode(),
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=None) as response:
                timings = json.load(response).get("timings", {})
        except urllib.error.HTTPError as error:
            raise ServerFailed(f"llama-server refused the documents: {error.code} {server_message(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            raise ServerFailed(f"llama-server stopped while reading the documents ({error})") from None
        print(f"selfextend-gguf serve: slot {slot}: read {timings.get('prompt_n', 0):,} tokens in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def server_message(error: urllib.error.HTTPError) -> str:
    """The message of llama-server's JSON error body, or the body itself."""
    body = error.read().decode("utf-8", errors="replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.strip()[:300]


def stop(child: subprocess.Popen) -> None:
    """End llama-server (SIGTERM, then SIGKILL after 10 s) and wait for it."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
