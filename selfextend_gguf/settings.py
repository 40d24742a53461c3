"""Self-Extend settings: the group size G and the neighbor window W, and how far they reach.

A query at position q and a key at position k use their normal positions when q - k < W, and
the grouped positions q // G + W - W // G and k // G otherwise (LongLM, arXiv 2401.01325).
The largest position a model then sees is (n - 1) // G + W - W // G, which must stay inside the
trained context L. Pure Python: the CLI and the server size contexts with it before loading a model.
"""
from __future__ import annotations

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


def largest_position(n_ctx: int, setting: SelfExtend) -> int:
    """The largest RoPE position a context of n_ctx tokens reaches with these settings."""
    if not setting.enabled:
        return n_ctx - 1
    group_size, window = setting.group_size, setting.neighbor_window
    return (n_ctx - 1) // group_size + window - window // group_size


def max_context(n_ctx_train: int, setting: SelfExtend) -> int:
    """The longest context whose positions all stay inside the trained context."""
    if not setting.enabled:
        return n_ctx_train
    group_size, window = setting.group_size, setting.neighbor_window
    return (n_ctx_train - window + window // group_size) * group_size


def validate(setting: SelfExtend, n_ctx: int, n_ctx_train: int, sliding_window: int | None = None) -> None:
    """Raise ValueError naming the problem and the fix.

    A model with sliding-window layers (Gemma 3) gets Self-Extend on its global layers only: a
    sliding-window layer sees keys less than n_swa tokens back, which Self-Extend leaves at their
    normal positions anyway when W >= n_swa. So W must be at least the sliding window."""
    group_size, window = setting.group_size, setting.neighbor_window
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"grp_attn_n must be an integer >= 1 or 'auto', got {group_size!r}")
    if not setting.enabled:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"grp_attn_w (the neighbor window) must be an integer >= 1, got {window!r}")
    if sliding_window and window < sliding_window:
        raise ValueError(f"grp_attn_w={window} is smaller than the model's sliding window ({sliding_window} "
                         f"tokens): its sliding-window layers are left as they are, which is exact only when "
                         f"every key they see is inside the neighbor window; use grp_attn_w >= {sliding_window}")
    if window >= n_ctx_train:
        raise ValueError(f"grp_attn_w={window} must be smaller than the model's trained context "
                         f"({n_ctx_train} tokens); try grp_attn_w={max(1, n_ctx_train // 8)}")
    reach = max_context(n_ctx_train, setting)
    if n_ctx > reach:
        needed = smallest_group_size(n_ctx, n_ctx_train, window, fraction=1.0)
        hint = f"grp_attn_n >= {needed}" if needed else "a smaller grp_attn_w"
        raise ValueError(f"n_ctx={n_ctx} is beyond what grp_attn_n={group_size}, grp_attn_w={window} reach "
                         f"({reach} tokens for a model trained on {n_ctx_train}); use {hint} or 'auto'")


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


def choose(n_ctx: int, n_ctx_train: int, sliding_window: int | None = None) -> SelfExtend:
    """grp_attn_n='auto': off inside the trained context, else W = default_window() and the smallest G
    that keeps W + (n_ctx - W)/G within 2/3 of the trained context L."""
    if n_ctx <= n_ctx_train:
        return SelfExtend()
    window = default_window(n_ctx_train, sliding_window)
    group_size = smallest_group_size(n_ctx, n_ctx_train, window, AUTO_TARGET_FRACTION)
    if group_size is None:
        raise ValueError(f"no group size lets n_ctx={n_ctx} fit a model trained on {n_ctx_train} tokens")
    return SelfExtend(group_size, window)


def resolve(grp_attn_n, grp_attn_w, n_ctx: int, info) -> SelfExtend:
    """Turn the user's grp_attn_n (an int or "auto") and grp_attn_w (an int or None) into checked
    settings for a context of n_ctx tokens per sequence of the model described by `info` (a
    gguf_info.ModelInfo). Raises ValueError naming the problem and the fix."""
    if grp_attn_n == "auto":
        chosen = choose(n_ctx, info.n_ctx_train, info.sliding_window)
        if grp_attn_w is not None and chosen.enabled:
            chosen = SelfExtend(chosen.group_size, grp_attn_w)
        setting = chosen
    else:
        if grp_attn_w is None and isinstance(grp_attn_n, int) and grp_attn_n > 1:
            grp_attn_w = default_window(info.n_ctx_train, info.sliding_window)
        setting = SelfExtend(grp_attn_n, grp_attn_w if grp_attn_w is not None else 0)
    validate(setting, n_ctx, info.n_ctx_train, info.sliding_window)
    if setting.enabled:
        if not info.has_rope:
            raise ValueError(f"Self-Extend needs a RoPE model; {info.architecture} ({info.path.name}) has none")
        if info.rope_scaling_type == "yarn":
            raise ValueError(f"{info.path.name} already uses YaRN RoPE scaling, which Self-Extend does not "
                             "compose with; run it without grp_attn_n or pick a model without YaRN")
    return setting
