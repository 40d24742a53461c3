"""Method names as the command line and the results file spell them (no llama.cpp needed).

    vanilla, sink, linear, yarn       the method alone
    chunked, chunked-gG-wW            llama-completion's Self-Extend, G=4 W=1024 unless given
    exact, exact-auto, exact-gG-wW    this project's exact Self-Extend, auto G/W unless given
"""
from __future__ import annotations

import re

from .. import settings

METHODS = ("vanilla", "sink", "linear", "yarn", "chunked", "exact")
CHUNKED_DEFAULT = (4, 1024)   # the G, W for llama-completion
N_BATCH = 2048                # llama-completion's default logical batch (common.h n_batch)

_NAME = re.compile(r"^(?P<method>[a-z]+)(?:-(?P<auto>auto)|-g(?P<g>\d+)-w(?P<w>\d+))?$")


def parse(name: str) -> tuple:
    """"exact-g4-w1024" -> ("exact", {"group_size": 4, "window": 1024}); ValueError if unknown."""
    match = _NAME.match(name)
    if not match or match["method"] not in METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}, "
                         "chunked-gG-wW, exact-auto or exact-gG-wW")
    options = {}
    if match["g"]:
        if match["method"] not in ("chunked", "exact"):
            raise ValueError(f"{match['method']} takes no G/W ({name!r})")
        options = {"group_size": int(match["g"]), "window": int(match["w"])}
    elif match["auto"] and match["method"] != "exact":
        raise ValueError(f"only exact has an -auto setting ({name!r})")
    return match["method"], options


def describe(name: str, length: int, n_ctx_train: int) -> str:
    """A short human note of what the method does at this length (for tables)."""
    method, options = parse(name)
    if method == "exact" and not options:
        chosen = settings.resolve("auto", None, length, n_ctx_train)
        return f"G={chosen.group_size} W={chosen.neighbor_window}" if chosen.enabled else "off"
    if method == "chunked" and not options:
        options = dict(zip(("group_size", "window"), CHUNKED_DEFAULT))
    if options:
        return f"G={options['group_size']} W={options['window']}"
    if method in ("linear", "yarn"):
        return f"scale={min(1.0, n_ctx_train / length):.3g}"
    return ""
