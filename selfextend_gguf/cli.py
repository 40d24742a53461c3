"""The selfextend-gguf command: chat about long documents, one-shot runs for scripts, model info.

    selfextend-gguf chat --doc book.txt                          # multi-turn, the book read once
    selfextend-gguf run --doc book.txt -p "Who is the captain?"  # answer on stdout (--json: with timings)
    selfextend-gguf info --ctx 32768                             # what Self-Extend would do, no loading

--model defaults to the embedded SmolLM2-135M-Instruct. Exit codes: 0 done, 1 failed while running,
2 bad command line or inputs (nothing was run), 130 stopped by Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import settings
from ._native import LlamaLogCapture
from .documents import STDIN, DocumentError, load_documents, read_text_file
from .gguf_info import read_model_info
from .models import ModelNotInstalledError, default_model_path
from .serve import add_serve_arguments, serve
from .settings import group_size_arg, positive_int_arg

PROG = "selfextend-gguf"
RUN_TOKENS = 256       # -n default for run
CHAT_TOKENS = 1024     # -n default for chat (per answer)

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def say(message: str, style: str | None = None) -> None:
    """A message to the user, on stderr (stdout carries only answers and requested output)."""
    stderr.print(Text(message, style=style or ""), soft_wrap=True)


def chat_module():
    """selfextend_gguf.chat, imported on first use: importing it loads llama.cpp (libllama), which
    `info` without --doc and `serve` do without. The one place this module imports it."""
    from . import chat
    return chat


# ----------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Exact Self-Extend for GGUF models: "
                                     "read documents longer than the model's trained context.",
                                     epilog="exit codes: 0 done, 1 failed while running, 2 bad command line "
                                     "or inputs, 130 stopped by Ctrl-C")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{chat,run,info,serve}")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", "-m", metavar="PATH", help="GGUF model (default: the embedded SmolLM2-135M-Instruct)")
    model.add_argument("--ctx", "-c", type=positive_int_arg, metavar="N",
                       help="context size in tokens (default: the documents plus room to answer)")
    model.add_argument("--grp-attn-n", type=group_size_arg, default="auto", metavar="G|auto",
                       help="Self-Extend group size; auto (default) picks it from the context and the trained context")
    model.add_argument("--grp-attn-w", type=positive_int_arg, metavar="W",
                       help="Self-Extend neighbor window (default: min(1024, trained context / 8))")
    model.add_argument("--flash-attn", "-fa", choices=("on", "off"), default="on",
                       help="flash attention (default: on, the fastest path)")

    documents = argparse.ArgumentParser(add_help=False)
    documents.add_argument("--doc", "-d", action="extend", nargs="+", default=[], metavar="FILE",
                           help="documents to read first: text, Markdown, PDF, EPUB, HTML, DOCX (by content), "
                           "folders of them, - for stdin")

    generation = argparse.ArgumentParser(add_help=False, parents=[model, documents])
    generation.add_argument("--temp", type=float, metavar="T", help="sampling temperature (0 = greedy)")
    generation.add_argument("--verbose", "-v", action="store_true", help="show llama.cpp's logs")

    chat = commands.add_parser("chat", parents=[generation], help="chat about documents",
                               description="Chat about documents: they are read once, every question reuses them. "
                               "Type /help in the chat for its commands.")
    chat.add_argument("-n", type=positive_int_arg, default=CHAT_TOKENS, metavar="N",
                      help=f"longest answer in tokens (default {CHAT_TOKENS})")
    chat.set_defaults(handler=chat_command, temp_default=0.7)

    run = commands.add_parser("run", parents=[generation], help="one-shot completion for scripts",
                              description="Answer one prompt: the answer on stdout, messages on stderr.")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="the prompt (a question about the documents)")
    prompt.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE")
    run.add_argument("-n", type=positive_int_arg, default=RUN_TOKENS, metavar="N",
                     help=f"tokens to generate at most (default {RUN_TOKENS})")
    run.add_argument("--raw", action="store_true",
                     help="plain completion of the documents and prompt, without the chat template")
    run.add_argument("--json", action="store_true", help="print the answer and timings as JSON")
    run.set_defaults(handler=run_command, temp_default=0.0)

    info = commands.add_parser("info", parents=[model, documents],
                               help="what a model is and how far Self-Extend takes it",
                               description="Show a GGUF model's metadata and the Self-Extend settings for "
                               "--ctx (or how far several group sizes reach), without loading it; with --doc, "
                               "each document's kind, size and tokens and the G and W that chat and run pick.")
    info.set_defaults(handler=info_command)

    serve_parser = commands.add_parser("serve", help="llama.cpp's llama-server with exact Self-Extend in every slot",
                                       description="Run llama-server (built from the patched llama.cpp) with G and "
                                       "W chosen for the context of each slot. Anything after -- goes to llama-server.")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve)
    return parser


def model_path(args) -> Path:
    return Path(args.model).expanduser() if args.model else default_model_path()


# ----------------------------------------------------------------------------- chat and run

def open_for(args, *, question: str = "", room: int, raw: bool = False):
    """The session a chat or run command asks for, with its settings reported on stderr."""
    chat = chat_module()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(message)s")
    if not args.verbose:
        args.llama_logs.install()
    documents = load_with_progress(args.doc)
    temperature = args.temp if args.temp is not None else args.temp_default
    with stderr.status("loading the model"):
        session = chat.open_session(model_path(args), documents, question=question, room=room,
                                    n_ctx=args.ctx, grp_attn_n=args.grp_attn_n, grp_attn_w=args.grp_attn_w,
                                    raw=raw, max_answer_tokens=args.n, sampling={"temperature": temperature},
                                    flash_attn=args.flash_attn == "on", verbose=args.verbose)
    llm = session.llm
    extend = (f"Self-Extend G={llm.grp_attn_n}, W={llm.grp_attn_w:,}" if llm.grp_attn_n > 1
              else "Self-Extend off (not needed)")
    say(f"{llm.model_info.path.name}: n_ctx {session.n_ctx:,} (trained on {llm.model_info.n_ctx_train:,}), "
        f"{extend}", style="dim")
    return session


def load_with_progress(paths):
    """load_documents with a progress bar for the pages and chapters of PDFs and EPUBs (gone when done)."""
    if not stderr.is_terminal:  # a log or a pipe: no bar, no stray blank line
        return load_documents(paths)
    progress = Progress(TextColumn("extracting {task.description}"), BarColumn(),
                        TextColumn("{task.completed:,}/{task.total:,}"), TimeRemainingColumn(), console=stderr,
                        transient=True)
    tasks = {}

    def advance(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done)

    with progress:
        return load_documents(paths, on_progress=advance)


class TokenSpeedColumn(ProgressColumn):
    """Tokens per second since the start (the progress advances n_batch tokens at a time)."""

    def render(self, task) -> Text:
        speed = task.completed / task.elapsed if task.elapsed and task.completed else None
        return Text(f"{speed:,.0f} tok/s" if speed else "? tok/s", style="progress.data.speed")


def ingest(session) -> None:
    """Evaluate the documents with a progress bar (tokens, tokens/s, time left)."""
    progress = Progress(TextColumn("reading"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tokens"),
                        TokenSpeedColumn(), TimeRemainingColumn(), console=stderr,
                        speed_estimate_period=300)  # time left from the last 5 minutes, not 30 s
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("reading", total=total)
        progress.update(task, completed=done)

    with progress:
        session.ingest(on_progress=advance)
    stats = session.ingested
    if session.documents:
        names = ", ".join(doc.name for doc in session.documents)
        say(f"read {names}: {stats.tokens:,} tokens in {stats.seconds:.1f} s "
            f"({stats.tokens / max(stats.seconds, 1e-9):,.0f} tok/s)", style="dim")


def run_command(args) -> int:
    prompt = args.prompt if args.prompt is not None else read_text_file(args.file, "prompt file")
    session = open_for(args, question=prompt, room=args.n, raw=args.raw)
    ingest(session)
    answer = []
    for text in session.ask(prompt):
        answer.append(text)
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()
    turn, ingested, llm = session.last_turn, session.ingested, session.llm
    if args.json:
        prompt_evaluated = ingested.tokens + turn.prompt_evaluated
        prompt_seconds = ingested.seconds + turn.prompt_seconds
        print(json.dumps({
            "text": "".join(answer), "finish_reason": turn.finish_reason,
            "model": str(llm.model_info.path), "n_ctx": session.n_ctx, "n_ctx_train": llm.model_info.n_ctx_train,
            "grp_attn_n": llm.grp_attn_n, "grp_attn_w": llm.grp_attn_w,
            "prompt_tokens": turn.prompt_tokens, "prompt_seconds": round(prompt_seconds, 3),
            "prompt_tokens_per_second": round(prompt_evaluated / max(prompt_seconds, 1e-9), 2),
            "generated_tokens": turn.generated_tokens, "generation_seconds": round(turn.generation_seconds, 3),
            "tokens_per_second": round(turn.generated_tokens / max(turn.generation_seconds, 1e-9), 2),
        }, indent=2))
    else:
        sys.stdout.write("\n")
    if turn.finish_reason == "context full":
        say("the answer stopped: the context is full (use a larger --ctx)", style="yellow")
    return 0


def chat_command(args) -> int:
    if STDIN in args.doc and not sys.stdin.isatty():
        raise DocumentError("chat --doc - would use up standard input, which the chat reads its questions "
                            "from; pass a file, or use run --doc - for one question")
    session = open_for(args, room=chat_module().CHAT_ROOM)
    ingest(session)
    return ChatLoop(session).run()


HELP = """\
Ask about the documents; answers stream as they come (**Ctrl-C** stops one, not the chat).

| command | what it does |
|---|---|
| `/help` | this list |
| `/stats` | context used, trained context, Self-Extend G and W, speed |
| `/reset` | forget the conversation; the documents stay read |
| `/save FILE` | save the session: conversation, documents, KV cache |
| `/load FILE` | continue a saved session (same model, --ctx, G and W) |
| `/exit` | quit (also **Ctrl-D**) |
"""


class ChatLoop:
    """The chat's terminal side: read a line, run a /command or stream the answer to a question."""

    def __init__(self, session):
        self.session = session
        self.prompt = None
        if sys.stdin.isatty() and sys.stdout.isatty():
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory
            self.prompt = PromptSession(history=InMemoryHistory())

    def read_line(self) -> str:
        if self.prompt is not None:
            return self.prompt.prompt("> ")
        line = sys.stdin.readline()  # piped input: one question or command a line
        if not line:
            raise EOFError
        return line

    def run(self) -> int:
        topic = "about the documents" if self.session.documents else "anything"
        say(f"Ask {topic}. /help lists the commands, /exit quits.", style="dim")
        while True:
            try:
                line = self.read_line().strip()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                return 0
            if line in ("/exit", "/quit"):
                return 0
            try:
                if line.startswith("/"):
                    self.command(*line.split(maxsplit=1))
                elif line:
                    self.answer(line)
            except KeyboardInterrupt:  # e.g. during a long /save
                say("\n(stopped)", style="yellow")

    def answer(self, question: str) -> None:
        chat = chat_module()
        stream = self.session.ask(question)
        try:
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        except chat.ContextFullError as error:
            say(str(error), style="yellow")
            return
        except KeyboardInterrupt:
            stream.close()  # keeps the partial answer in the conversation
            sys.stdout.write("\n")
            say("(stopped)", style="yellow")
            return
        sys.stdout.write("\n")
        turn = self.session.last_turn
        say(f"{turn.generated_tokens:,} tokens at {turn.generated_tokens / max(turn.generation_seconds, 1e-9):,.1f} "
            f"tok/s; prompt: {turn.prompt_evaluated:,} tokens evaluated in {turn.prompt_seconds:.2f} s, "
            f"{turn.cached_tokens:,} from the cache", style="dim")
        if turn.finish_reason == "context full":
            say("the context is full: /reset starts the conversation over with the documents still read",
                style="yellow")
        elif turn.finish_reason == "length":
            say(f"(the answer reached the -n limit of {self.session.max_answer_tokens:,} tokens)", style="dim")

    def command(self, name: str, argument: str = "") -> None:
        chat = chat_module()
        session = self.session
        if name == "/help":
            stderr.print(Markdown(HELP))
        elif name == "/stats":
            stderr.print(self.stats())
        elif name == "/reset":
            session.reset()
            say("the conversation is cleared; the documents stay read")
        elif name in ("/save", "/load") and not argument:
            say(f"usage: {name} FILE", style="yellow")
        elif name == "/save":
            try:
                session.save(argument)
            except chat.SessionFileError as error:
                return say(str(error), style="red")
            size = Path(argument).expanduser().stat().st_size
            say(f"saved the session to {argument} ({size / 2**20:,.1f} MiB)")
        elif name == "/load":
            try:
                session.load(argument)
            except chat.SessionFileError as error:
                return say(str(error), style="red")
            say(f"loaded {argument}: {len(session.messages) // 2} questions and answers, "
                f"{session.n_used:,} tokens in the context")
        else:
            say(f"unknown command {name}; /help lists the commands", style="yellow")

    def stats(self) -> Table:
        session, llm = self.session, self.session.llm
        table = Table.grid(padding=(0, 2))
        table.add_row("context", f"{session.n_used:,} of {session.n_ctx:,} tokens used; "
                      f"the model was trained on {llm.model_info.n_ctx_train:,}")
        extend = settings.SelfExtend(llm.grp_attn_n, llm.grp_attn_w)
        table.add_row("self-extend", f"G={llm.grp_attn_n}, W={llm.grp_attn_w:,}, reaching "
                      f"{settings.max_context(llm.model_info.n_ctx_train, extend):,} tokens"
                      if extend.enabled else "off (G=1)")
        read = session.ingested
        names = ", ".join(doc.name for doc in session.documents) or "none"
        table.add_row("documents", f"{names}: {read.tokens:,} tokens, read at "
                      f"{read.tokens / max(read.seconds, 1e-9):,.0f} tok/s")
        turn = session.last_turn
        if turn is not None:
            table.add_row("last answer", f"prompt {turn.prompt_tokens:,} tokens: {turn.prompt_evaluated:,} evaluated "
                          f"in {turn.prompt_seconds:.2f} s, {turn.cached_tokens:,} from the cache; "
                          f"{turn.generated_tokens:,} tokens generated at "
                          f"{turn.generated_tokens / max(turn.generation_seconds, 1e-9):,.1f} tok/s")
        table.add_row("evaluated", f"{llm.n_evaluated:,} tokens in all")
        return table


# ----------------------------------------------------------------------------- info

def file_type_name(file_type: int | None) -> str:
    import gguf
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        return "unknown" if file_type is None else f"type {file_type}"


def info_command(args) -> int:
    info = read_model_info(model_path(args))
    table = Table.grid(padding=(0, 2))
    table.add_column()
    table.add_column(overflow="fold")
    table.add_row("model", str(info.path))
    table.add_row("architecture", info.architecture)
    table.add_row("trained context", f"{info.n_ctx_train:,} tokens")
    rope = f"{info.rope_freq_base:,.0f}" if info.rope_freq_base else "default"
    table.add_row("RoPE base", rope + (f" (scaling: {info.rope_scaling_type})" if info.rope_scaling_type else ""))
    table.add_row("quantization", file_type_name(info.file_type))
    table.add_row("size", f"{info.size_bytes / 2**20:,.1f} MiB")
    stdout.print(table)
    if args.doc:
        return info_documents(args, info)
    if refuse_self_extend(info):
        return 0
    window = args.grp_attn_w or settings.default_window(info.n_ctx_train, info.sliding_window)
    if args.ctx is None and args.grp_attn_n == "auto":
        reach = Table("--grp-attn-n", "--grp-attn-w", "reaches (tokens)")
        for g in (2, 4, 8, 16, 32):
            reach.add_row(str(g), f"{window:,}", f"{settings.max_context(info.n_ctx_train, settings.SelfExtend(g, window)):,}")
        stdout.print("\nSelf-Extend: how far each group size reaches (--ctx N: what auto picks)")
        stdout.print(reach)
        return 0
    n_ctx = args.ctx or info.n_ctx_train
    setting = settings.decide(info, args.grp_attn_n, args.grp_attn_w, n_ctx, spelling=settings.CLI, strict=True)
    reach = settings.max_context(info.n_ctx_train, setting)
    if setting.enabled:
        stdout.print(f"Self-Extend for --ctx {n_ctx:,}: --grp-attn-n {setting.group_size} --grp-attn-w "
                     f"{setting.neighbor_window}, reaching {reach:,} tokens", soft_wrap=True)
    else:
        stdout.print(f"Self-Extend for --ctx {n_ctx:,}: off, the trained context ({reach:,} tokens) holds it",
                     soft_wrap=True)
    return 0


def refuse_self_extend(info) -> bool:
    """Print why Self-Extend cannot run on the model, if it cannot; True then."""
    if info.self_extend_refusal:
        stdout.print(f"Self-Extend: not possible ({info.architecture} {info.self_extend_refusal})", soft_wrap=True)
    return bool(info.self_extend_refusal)


def info_documents(args, info) -> int:
    """Each document's kind, sections, characters and tokens, and the n_ctx, G and W that chat and run
    (with its default -n) would pick for them: the sizing open_session does, on the vocabulary only."""
    chat = chat_module()
    documents = load_with_progress(args.doc)
    args.llama_logs.install()
    n_prompt, per_document, format_name = chat.size_prompt(info, documents, raw=None, each_document=True)
    table = Table("document", "kind", "pages/chapters", "characters", "tokens")
    for doc, tokens in zip(documents, per_document):
        sections = f"{doc.sections:,} {doc.sections_name}" if doc.sections is not None else "-"
        table.add_row(doc.name, doc.kind, sections, f"{len(doc.text):,}", f"{tokens:,}")
    stdout.print()
    stdout.print(table)
    stdout.print(f"prompt with the documents: {n_prompt:,} tokens ({format_name} format)")
    if refuse_self_extend(info):
        return 0
    for command, room in (("chat", chat.CHAT_ROOM), (f"run -n {RUN_TOKENS}", RUN_TOKENS)):
        plan = chat.plan_for_prompt(n_prompt, room, info, n_ctx=args.ctx, grp_attn_n=args.grp_attn_n,
                                    grp_attn_w=args.grp_attn_w)
        extend = (f"--grp-attn-n {plan.self_extend.group_size} --grp-attn-w {plan.self_extend.neighbor_window}, "
                  f"reaching {plan.reach:,} tokens" if plan.self_extend.enabled
                  else "Self-Extend off (the trained context holds it)")
        stdout.print(f"{command}: n_ctx {plan.n_ctx:,}, {extend}", soft_wrap=True)
    return 0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on a bad command line
    args.llama_logs = LlamaLogCapture()  # installed by the commands that load llama.cpp (unless --verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        say("\nstopped", style="yellow")
        return 130
    except ModelNotInstalledError as error:
        return fail(str(error), 1)
    except (ValueError, FileNotFoundError) as error:
        # inputs that cannot work: files (DocumentError, not GGUF), sizes and settings (SetupError)
        return fail(str(error), 2)
    except Exception as error:  # failures while running: llama.cpp, the library, a full context
        detail = f" (llama.cpp: {args.llama_logs.last_error})" if args.llama_logs.last_error else ""
        return fail(f"{error}{detail}", 1)


def fail(message: str, code: int) -> int:
    say(f"{PROG}: error: {message}", style="red")
    return code
