"""A conversation about documents with a Self-Extend model: read the documents once, then ask.

    session = open_session("model.gguf", load_documents(["book.txt"]))   # sizes n_ctx, picks G and W
    session.ingest(on_progress=lambda done, total: ...)                  # evaluates the documents once
    for text in session.ask("Who is the captain?"):                      # streamed answer
        print(text, end="")
    session.save("talk.session")   # later, in a session opened the same way: session.load(...)

Each question's prompt is the whole conversation rendered with the model's chat template. The
documents come first in it, so every prompt starts with tokens already in the KV cache and
llama-cpp-python's prefix reuse (Llama.generate) evaluates only what is new.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import settings, state_file
from .documents import Document, documents_text
from .gguf_info import read_model_info
from .llama import Llama, llama_cpp

CHAT_ROOM = 2048          # tokens left for the conversation after the documents, unless --ctx
MIN_ANSWER_TOKENS = 16    # a question is refused when fewer tokens than this are left to answer
UTF8_SLACK = 3            # create_completion may pass max_tokens by up to 3 to finish a UTF-8 character


class SetupError(ValueError):
    """The model, documents or settings cannot work together; nothing was evaluated."""


class ContextFullError(RuntimeError):
    """The conversation has no room left in the context."""


SessionFileError = state_file.StateFileError  # a session file that cannot be loaded into this session


class MeteredLlama(Llama):
    """Llama that counts the tokens it evaluates and samples (llama-cpp-python's generate and
    create_completion evaluate every token with eval and sample every token with sample)."""

    def __init__(self, *args, **kwargs):
        self.n_evaluated = 0
        self.n_sampled = 0
        super().__init__(*args, **kwargs)

    def eval(self, tokens):
        super().eval(tokens)
        self.n_evaluated += len(tokens)

    def sample(self, *args, **kwargs):
        token = super().sample(*args, **kwargs)
        self.n_sampled += 1
        return token


# ----------------------------------------------------------------------------- prompt formats

class ChatTemplate:
    """The model's own chat template (tokenizer.chat_template in the GGUF), rendered as
    llama-cpp-python's create_chat_completion renders it."""
    name = "chat"
    add_bos = False   # the template writes the BOS token itself where the model wants one
    special = True    # "<|im_start|>" etc. in the rendered text are special tokens

    def __init__(self, llm: Llama):
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise SetupError(f"{Path(llm.model_path).name} has no chat template; "
                             "use `selfextend-gguf run --raw` for plain text completion")

        def token_text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

        eos = token_text(llm.token_eos())
        self._formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=token_text(llm.token_bos()))
        self.stop = [eos] if eos else []

    def render(self, messages: list[dict]) -> str:
        try:
            return self._formatter(messages=messages).prompt
        except Exception as error:  # jinja2 errors, or the template's own raise_exception
            raise SetupError(f"the model's chat template failed: {error}") from None


class RawText:
    """No template: the text as is (for base models, or prompts written as completions)."""
    name = "raw"
    add_bos = True    # llama.cpp adds BOS only if the model asks for it
    special = False
    stop: list[str] = []

    def render(self, messages: list[dict]) -> str:
        return "\n\n".join(message["content"] for message in messages)


def first_message(documents: list[Document], question: str) -> dict:
    """The conversation's first message: the documents, then the question. The server's page builds
    the same (selfextend_gguf/web/index.html, firstMessage), so its questions reuse the documents'
    cache."""
    if not documents:
        return {"role": "user", "content": question}
    return {"role": "user", "content": f"{documents_text(documents)}\n\n{question}"}


# ----------------------------------------------------------------------------- sizing

@dataclass(frozen=True)
class ContextPlan:
    n_ctx: int
    self_extend: settings.SelfExtend
    reach: int        # the longest context these settings keep inside the trained context


def plan_context(n_needed: int, info, *, n_ctx: int | None = None, grp_attn_n="auto",
                 grp_attn_w: int | None = None, n_documents: int | None = None) -> ContextPlan:
    """n_ctx (n_needed unless given) and the Self-Extend settings for it on the model (a
    gguf_info.ModelInfo), decided by settings.decide in the CLI's spelling (chosen when "auto").

    n_documents: the tokens that must fit before any answer (the documents and prompt).
    Raises SetupError saying what does not fit, by how much, and what would.
    """
    n_documents = n_needed if n_documents is None else n_documents
    if n_ctx is not None and n_ctx < n_documents + MIN_ANSWER_TOKENS + UTF8_SLACK:
        raise SetupError(f"the documents and prompt take {n_documents:,} tokens: --ctx {n_ctx:,} leaves no "
                         f"room to answer; use --ctx {n_documents + CHAT_ROOM:,} or leave --ctx out")
    n_ctx = n_ctx or n_needed
    try:
        setting = settings.decide(info, grp_attn_n, grp_attn_w, n_ctx, spelling=settings.CLI, strict=True)
    except settings.BeyondReach as beyond:  # said in terms of the documents
        raise SetupError(_too_long_message(n_documents, info.n_ctx_train, beyond, info.sliding_window)) from None
    except ValueError as error:
        raise SetupError(str(error)) from None
    return ContextPlan(n_ctx, setting, settings.max_context(info.n_ctx_train, setting))


def _too_long_message(n_documents, n_ctx_train, beyond: settings.BeyondReach, sliding_window=None) -> str:
    n_ctx, reach, setting = beyond.n_ctx, beyond.reach, beyond.setting
    what = (f"--grp-attn-n {setting.group_size} --grp-attn-w {setting.neighbor_window}" if setting.enabled
            else "Self-Extend off (--grp-attn-n 1)")
    window = setting.neighbor_window or settings.default_window(n_ctx_train, sliding_window)
    fitting = beyond.fitting or settings.smallest_group_size(n_ctx, n_ctx_train, window, fraction=1.0)
    fix = (f"--grp-attn-n {fitting} reaches it (or --grp-attn-n auto)" if fitting
           else "use a smaller --grp-attn-w, or fewer documents")
    return (f"the documents and prompt take {n_documents:,} tokens, a context of {n_ctx:,} with room to answer: "
            f"{n_ctx - reach:,} more than {what} reach with a model trained on {n_ctx_train:,} tokens "
            f"({reach:,}); {fix}")


# ----------------------------------------------------------------------------- the session

@dataclass
class TurnStats:
    prompt_tokens: int = 0         # the whole prompt: documents and conversation
    prompt_evaluated: int = 0      # of which llama.cpp evaluated (the rest came from the cache)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0      # sampled, the end-of-generation token included
    generation_seconds: float = 0.0
    finish_reason: str = ""        # "stop", "length", "context full" or "interrupted"

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_evaluated


@dataclass
class IngestStats:
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class ChatSession:
    llm: MeteredLlama
    prompt_format: ChatTemplate | RawText
    documents: list[Document]
    max_answer_tokens: int = 1024
    sampling: dict = field(default_factory=dict)   # create_completion's temperature, top_p, ...
    messages: list[dict] = field(default_factory=list)
    ingested: IngestStats = field(default_factory=IngestStats)
    last_turn: TurnStats | None = None

    # --- what the model reads

    def first_message(self, question: str) -> dict:
        return first_message(self.documents, question)

    def conversation(self, question: str) -> list[dict]:
        if not self.messages:
            return [self.first_message(question)]
        return self.messages + [{"role": "user", "content": question}]

    def tokenize(self, messages: list[dict]) -> list[int]:
        text = self.prompt_format.render(messages)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.prompt_format.add_bos,
                                 special=self.prompt_format.special)

    def document_tokens(self) -> list[int]:
        """The tokens every first prompt starts with, whatever the question: the template's opening
        and the documents (found as the common start of two prompts with different questions)."""
        one, other = self.tokenize([self.first_message("A")]), self.tokenize([self.first_message("B")])
        return one[:Llama.longest_token_prefix(one, other)]

    # --- sizes

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx_requested  # llama.cpp pads n_ctx; Self-Extend's reach is checked for this

    @property
    def n_used(self) -> int:
        return self.llm.n_tokens

    # --- the work

    def ingest(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Evaluate the documents (once; the questions reuse them), n_batch tokens at a time."""
        tokens = self.document_tokens()
        on_progress = on_progress or (lambda done, total: None)
        start = time.perf_counter()
        self.llm.reset()
        on_progress(0, len(tokens))
        for begin in range(0, len(tokens), self.llm.n_batch):
            self.llm.eval(tokens[begin:begin + self.llm.n_batch])
            on_progress(min(begin + self.llm.n_batch, len(tokens)), len(tokens))
        self.ingested = IngestStats(len(tokens), time.perf_counter() - start)

    def ask(self, question: str, max_tokens: int | None = None) -> Iterator[str]:
        """Stream the answer to `question`, then add both to the conversation.

        Closing the iterator early (or Ctrl-C while iterating) keeps the partial answer.
        Raises ContextFullError when the prompt leaves fewer than MIN_ANSWER_TOKENS to answer.
        """
        conversation = self.conversation(question)
        tokens = self.tokenize(conversation)
        requested = max_tokens or self.max_answer_tokens
        room = self.n_ctx - len(tokens) - UTF8_SLACK
        if room < min(MIN_ANSWER_TOKENS, requested):
            raise ContextFullError(
                f"no room left in the context: this prompt takes {len(tokens):,} of {self.n_ctx:,} tokens "
                f"(the documents {self.ingested.tokens:,}); /reset starts the conversation over with the "
                "documents still loaded, or start again with a larger --ctx")
        max_tokens = min(requested, room)
        turn = self.last_turn = TurnStats(prompt_tokens=len(tokens), finish_reason="interrupted")
        evaluated_before, sampled_before, start = self.llm.n_evaluated, self.llm.n_sampled, time.perf_counter()
        first_token_at = None

        def note_first_token(input_ids, logits) -> bool:  # a stopping criterion that never stops
            nonlocal first_token_at
            if first_token_at is None:  # the prompt is evaluated, the first token sampled
                first_token_at = time.perf_counter()
                turn.prompt_evaluated = self.llm.n_evaluated - evaluated_before
                turn.prompt_seconds = first_token_at - start
            return False

        stream = self.llm.create_completion(
            tokens, max_tokens=max_tokens, stop=self.prompt_format.stop, stream=True,
            stopping_criteria=llama_cpp.StoppingCriteriaList([note_first_token]), **self.sampling)
        answer = []
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                if choice["text"]:
                    answer.append(choice["text"])
                    yield choice["text"]
                if choice["finish_reason"]:
                    turn.finish_reason = choice["finish_reason"]
            if turn.finish_reason == "length" and max_tokens < requested:
                turn.finish_reason = "context full"
        finally:
            if first_token_at is not None:
                turn.generation_seconds = time.perf_counter() - first_token_at
            turn.generated_tokens = self.llm.n_sampled - sampled_before
            if answer or turn.finish_reason != "interrupted":
                self.messages = conversation + [{"role": "assistant", "content": "".join(answer)}]

    def reset(self) -> None:
        """Forget the conversation; the documents stay in the cache for the next question."""
        self.messages = []
        self.last_turn = None

    # --- session files

    def save(self, path) -> None:
        """Write the conversation, the documents and the KV cache to `path` (a state_file)."""
        state_file.save(path, self.llm, self.n_ctx, {
            "prompt_format": self.prompt_format.name, "messages": self.messages,
            "documents": [[str(doc.path), doc.text] for doc in self.documents],
            "ingested": [self.ingested.tokens, self.ingested.seconds]})

    def load(self, path) -> None:
        """Continue a session saved by save(), from a session opened with the same model and settings.
        Everything is checked before the context is touched: on an error the session is as it was."""
        path = Path(path).expanduser()
        saved = state_file.read(path)
        state_file.check(saved, self.llm, self.n_ctx, path.name)
        if saved.meta.get("prompt_format") != self.prompt_format.name:
            raise SessionFileError(f"{path.name} was saved with the prompt format {saved.meta.get('prompt_format')} "
                                   f"(this chat: {self.prompt_format.name}); start the chat the same way to load it")
        state_file.restore(saved, self.llm)
        self.documents = [Document(Path(name), text) for name, text in saved.meta["documents"]]
        self.messages = saved.meta["messages"]
        self.ingested = IngestStats(*saved.meta["ingested"])
        self.last_turn = None


# ----------------------------------------------------------------------------- opening

def size_prompt(info, documents: list[Document], question: str = "", raw: bool | None = False,
                verbose: bool = False, each_document: bool = False) -> tuple[int, list[int], str]:
    """(tokens of the conversation holding the documents and question, each document's tokens if
    each_document (else []), the prompt format's name), on the model's vocabulary alone (no weights):
    how the context is sized before the model is loaded. raw=None: the chat template where the model
    has one, else raw text."""
    vocabulary = Llama(str(info.path), vocab_only=True, n_ctx=info.n_ctx_train, verbose=verbose)
    try:
        if raw:
            prompt_format = RawText()
        else:
            try:
                prompt_format = ChatTemplate(vocabulary)
            except SetupError:
                if raw is not None:
                    raise
                prompt_format = RawText()  # no chat template: run --raw is the way to use it
        per_document = [len(vocabulary.tokenize(doc.text.encode("utf-8"), add_bos=False))
                        for doc in documents] if each_document else []
        sizing = ChatSession(vocabulary, prompt_format, documents)
        n_prompt = len(sizing.tokenize(sizing.conversation(question or "A")))
    finally:
        vocabulary.close()
    return n_prompt, per_document, prompt_format.name


def plan_for_prompt(n_prompt: int, room: int, info, **choices) -> ContextPlan:
    """plan_context for a prompt of n_prompt tokens (the documents and question) with `room` tokens after it
    (the conversation or the answer); choices: plan_context's n_ctx, grp_attn_n, grp_attn_w."""
    return plan_context(n_prompt + room + UTF8_SLACK, info, n_documents=n_prompt, **choices)


def open_session(model_path, documents: list[Document], *, question: str = "", room: int = CHAT_ROOM,
                 n_ctx: int | None = None, grp_attn_n="auto", grp_attn_w: int | None = None,
                 raw: bool = False, max_answer_tokens: int = 1024, sampling: dict | None = None,
                 flash_attn: bool = True, verbose: bool = False) -> ChatSession:
    """Load the model with a context sized to the documents (and `question`) plus `room` tokens.

    Raises SetupError (or FileNotFoundError) for a model, documents or settings that cannot work.
    """
    try:
        info = read_model_info(model_path)
        # said before the vocabulary is read: llama.cpp may not read a refused architecture's
        settings.refuse(info, grp_attn_n, spelling=settings.CLI)
    except ValueError as error:
        raise SetupError(str(error)) from None
    # the vocabulary alone (no weights) tokenizes the documents before n_ctx is known
    n_prompt, _, _ = size_prompt(info, documents, question, raw, verbose)
    plan = plan_for_prompt(n_prompt, room, info, n_ctx=n_ctx, grp_attn_n=grp_attn_n, grp_attn_w=grp_attn_w)
    llm = MeteredLlama(str(info.path), n_ctx=plan.n_ctx, self_extend=plan.self_extend, flash_attn=flash_attn,
                       verbose=verbose)
    prompt_format = RawText() if raw else ChatTemplate(llm)
    return ChatSession(llm, prompt_format, documents, max_answer_tokens=max_answer_tokens,
                       sampling=sampling or {})
