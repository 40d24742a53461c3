"""Self-Extend settings: the group size G and the neighbor window W, and how far they reach.

A query at position q and a key at position k use their normal positions when q - k < W, and
the grouped positions q // G + W - W // G and k // G otherwise (LongLM, arXiv 2401.01325).
The largest position a model then sees is (n - 1) // G + W - W // G, which must stay inside the
trained context L. Pure Python: the API, the CLI and the server decide G and W here (decide: for
a model file's metadata; resolve: for its trained context alone), before loading a model.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

# the paper's rule: keep W + (n_ctx - W) / G at most about 1/2 to 2/3 of the trained context
AUTO_TARGET_FRACTION = 2 / 3
AUTO_MAX_WINDOW = 1024


@dataclass(frozen=True)
class SelfExtend:
    group_size: int = 1        # G; 1 = off
    neighbor_window: int = 0   # W; ignored when group_size == 1

    @property
    def enabled(self) -> bool:
        return self.group_size > 1


def max_context(n_ctx_train: int, setting: SelfExtend) -> int:
    """The longest context whose positions all stay inside the trained context."""
    if not setting.enabled:
        return n_ctx_train
    group_size, window = setting.group_size, setting.neighbor_window
    return (n_ctx_train - window + window // group_size) * group_size


@dataclass(frozen=True)
class Spelling:
    """How the caller names the settings in error messages: the API's arguments or the CLI's flags."""
    group_size: str = "grp_attn_n"
    window: str = "grp_attn_w"
    n_ctx: str = "n_ctx"
    sep: str = "="      # "grp_attn_n=4"; the CLI's "--grp-attn-n 4"

    def __call__(self, name: str, value) -> str:
        return f"{getattr(self, name)}{self.sep}{value}"


API = Spelling()
CLI = Spelling("--grp-attn-n", "--grp-attn-w", "--ctx", " ")


class BeyondReach(ValueError):
    """n_ctx is longer than what the settings reach; `fitting` is the smallest G that would, or None."""

    def __init__(self, message: str, n_ctx: int, reach: int, setting: SelfExtend, fitting: int | None):
        super().__init__(message)
        self.n_ctx, self.reach, self.setting, self.fitting = n_ctx, reach, setting, fitting


def decide(info, grp_attn_n, grp_attn_w, n_ctx: int, spelling: Spelling = API, strict: bool = False) -> SelfExtend:
    """The one place G and W are decided for a model and a context: every front end (Llama, the CLI's
    chat, run and info, serve) calls it once and passes the result on. info: the model's
    gguf_info.ModelInfo; the other arguments are resolve()'s. Raises ValueError (BeyondReach when
    n_ctx is past the reach) naming the problem and the fix in the caller's spelling."""
    refuse(info, grp_attn_n, spelling)  # before any setting is checked against such a model
    setting = resolve(grp_attn_n, grp_attn_w, n_ctx, info.n_ctx_train, info.sliding_window, spelling, strict)
    refuse(info, setting.group_size, spelling)  # "auto" may have turned Self-Extend on
    return setting


def refuse(info, grp_attn_n, spelling: Spelling = API) -> None:
    """Raise ValueError if Self-Extend is asked for (an integer grp_attn_n > 1; "auto" asks for nothing
    yet) on a model (a gguf_info.ModelInfo) that it cannot run on: the first thing to say about such a
    model, before anything else is checked or read (decide() starts with it)."""
    if not (_is_int(grp_attn_n) and grp_attn_n > 1):
        return
    if info.self_extend_refusal:
        raise ValueError(f"Self-Extend cannot run on {info.path.name}: its architecture {info.architecture} "
                         f"{info.self_extend_refusal}. Run it without Self-Extend ({spelling('group_size', 1)})")
    if info.rope_scaling_type == "yarn":
        raise ValueError(f"{info.path.name} already uses YaRN RoPE scaling, which Self-Extend does not "
                         f"compose with; run it without Self-Extend ({spelling('group_size', 1)}) or pick a "
                         "model without YaRN")


def resolve(grp_attn_n, grp_attn_w, n_ctx: int, n_ctx_train: int, sliding_window: int | None = None,
            spelling: Spelling = API, strict: bool = False) -> SelfExtend:
    """G and W for a model known by its trained context (and sliding window): the user's grp_attn_n
    (an int, or "auto") and grp_attn_w (an int, or None for the default) for a context of n_ctx tokens
    per sequence, checked. Raises ValueError (BeyondReach when n_ctx is past the reach) naming the
    problem and the fix, in the caller's spelling of the settings. decide() adds the model's own checks.

    "auto": off inside the trained context; else W = grp_attn_w or default_window(), and the smallest G
    that keeps W + (n_ctx - W) / G within 2/3 of the trained context, or failing that, within it.
    strict: Self-Extend off past the trained context is an error too (the CLI's choice; the API
    allows it, for measuring plain RoPE there, and warns)."""
    window = grp_attn_w if grp_attn_w is not None else default_window(n_ctx_train, sliding_window)
    if grp_attn_n != "auto":
        setting = SelfExtend(grp_attn_n, window if _is_int(grp_attn_n) and grp_attn_n > 1 else 0)
    elif n_ctx <= n_ctx_train:
        setting = SelfExtend()
    else:
        group_size = (smallest_group_size(n_ctx, n_ctx_train, window, AUTO_TARGET_FRACTION)
                      or smallest_group_size(n_ctx, n_ctx_train, window, fraction=1.0))
        setting = SelfExtend(group_size or 2, window)  # none reaches n_ctx: validate says so
    validate(setting, n_ctx, n_ctx_train, sliding_window, spelling, strict)
    return setting


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(setting: SelfExtend, n_ctx: int, n_ctx_train: int, sliding_window: int | None = None,
             spelling: Spelling = API, strict: bool = False) -> None:
    """Raise ValueError naming the problem and the fix (BeyondReach when n_ctx is past the reach).

    A model with sliding-window layers (Gemma 3) gets Self-Extend on its global layers only: a
    sliding-window layer sees keys less than n_swa tokens back, which Self-Extend leaves at their
    normal positions anyway when W >= n_swa. So W must be at least the sliding window."""
    group_size, window = setting.group_size, setting.neighbor_window
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"{spelling.group_size} must be an integer >= 1 or 'auto', got {group_size!r}")
    if not setting.enabled:
        if strict and n_ctx > n_ctx_train:
            fitting = smallest_group_size(n_ctx, n_ctx_train, default_window(n_ctx_train, sliding_window), 1.0)
            raise BeyondReach(f"{spelling('n_ctx', n_ctx)} is longer than the model's trained context ({n_ctx_train} "
                              f"tokens) and Self-Extend is off; use {spelling.group_size} >= {fitting} or 'auto'",
                              n_ctx, n_ctx_train, setting, fitting)
        return
    if not _is_int(window) or window < 1:
        raise ValueError(f"{spelling.window} (the neighbor window) must be an integer >= 1, got {window!r}")
    if sliding_window and window < sliding_window:
        raise ValueError(f"{spelling('window', window)} is smaller than the model's sliding window ({sliding_window} "
                         f"tokens): its sliding-window layers are left as they are, which is exact only when "
                         f"every key they see is inside the neighbor window; use {spelling.window} >= {sliding_window}")
    if window >= n_ctx_train:
        raise ValueError(f"{spelling('window', window)} must be smaller than the model's trained context "
                         f"({n_ctx_train} tokens); try {spelling('window', max(1, n_ctx_train // 8))}")
    reach = max_context(n_ctx_train, setting)
    if n_ctx > reach:
        fitting = smallest_group_size(n_ctx, n_ctx_train, window, fraction=1.0)
        hint = f"{spelling.group_size} >= {fitting}" if fitting else f"a smaller {spelling.window}"
        raise BeyondReach(f"{spelling('n_ctx', n_ctx)} is beyond what {spelling('group_size', group_size)}, "
                          f"{spelling('window', window)} reach ({reach} tokens for a model trained on {n_ctx_train}); "
                          f"use {hint} or 'auto'", n_ctx, reach, setting, fitting)


def smallest_group_size(n_ctx: int, n_ctx_train: int, window: int, fraction: float) -> int | None:
    """The smallest G with W + (n_ctx - W) / G <= fraction * n_ctx_train, or None if none exists."""
    budget = fraction * n_ctx_train - window
    if budget <= 0:
        return None
    for group_size in range(2, 1025):
        if window + (n_ctx - window) / group_size <= budget + window:
            if max_context(n_ctx_train, SelfExtend(group_size, window)) >= n_ctx:
                return group_size
    return None


def default_window(n_ctx_train: int, sliding_window: int | None = None) -> int:
    """W = min(1024, L/8), and at least the sliding window of a model that has one (see validate)."""
    return max(1, min(AUTO_MAX_WINDOW, n_ctx_train // 8), sliding_window or 0)


# ----------------------------------------------------------------------------- the CLI's flags

def group_size_arg(text: str) -> int | str:
    """--grp-attn-n: 'auto' or an integer >= 1."""
    if text == "auto":
        return text
    try:
        return positive_int_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {text!r}") from None


def positive_int_arg(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
