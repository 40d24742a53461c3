"""`Llama` with Self-Extend: a drop-in subclass of llama_cpp.Llama.

    from selfextend_gguf import Llama
    llm = Llama("model.gguf", n_ctx=16384, grp_attn_n=4, grp_attn_w=1024)   # or grp_attn_n="auto"

Everything else (completion, chat, streaming, tokenize, save/load state, prefix reuse) is
llama-cpp-python's own code running on the patched library.
"""
from __future__ import annotations

import logging

from . import _native, settings
from .gguf_info import read_model_info

llama_cpp = _native.load_llama_cpp()

logger = logging.getLogger("selfextend_gguf")


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama plus Self-Extend.

    Args:
        grp_attn_n: group size G (1 = off, the default), or "auto" to pick G and W from n_ctx and
            the model's trained context by the paper's rule (W + (n_ctx - W)/G <= 2/3 of it).
        grp_attn_w: neighbor window W: keys closer than W to the query keep their normal positions.
            Defaults to min(1024, trained context / 8).
        grp_attn_rewind: exact rewinds: the most recently grouped tokens whose normal-position keys are
            kept, so that reusing a prefix after up to this many newer tokens (prefix reuse, a regenerated
            answer, a new question on a cached document) gives bit for bit what a fresh context gives.
            Costs that many rows of K. -1 (the default): an eighth of n_ctx, at least 512 tokens; 0: none.
        self_extend: G and W already decided for this model and n_ctx by settings.decide, instead of
            grp_attn_n and grp_attn_w: for a front end that decides them itself, to word its errors in
            its own spelling (the CLI's flags).
        flash_attn: True by default here (llama_cpp.Llama: False), as in llama.cpp's own programs: it is
            the fastest path, with Self-Extend and without (see scripts/bench_speed.py).
        Every other argument is llama_cpp.Llama's.
    """

    def __init__(self, model_path: str, *args, grp_attn_n: int | str = 1, grp_attn_w: int | None = None,
                 grp_attn_rewind: int = -1, self_extend: settings.SelfExtend | None = None, **kwargs):
        info = read_model_info(model_path)
        n_ctx = kwargs.get("n_ctx", 512) or info.n_ctx_train
        if self_extend is None:
            self_extend = settings.decide(info, grp_attn_n, grp_attn_w, n_ctx)
        elif (grp_attn_n, grp_attn_w) != (1, None):
            raise TypeError("pass Self-Extend's settings either as grp_attn_n and grp_attn_w or as self_extend, "
                            "not both")
        if not isinstance(grp_attn_rewind, int) or grp_attn_rewind < -1:
            raise ValueError(f"grp_attn_rewind={grp_attn_rewind!r}: pass a number of tokens, -1 for the default "
                             "(an eighth of n_ctx, at least 512) or 0 for none")
        # fails before loading if the library lacks the patch; the tests call its functions as llm._lib
        self._lib = _native.require_self_extend_symbols()
        self.model_info = info
        self.self_extend = settings.SelfExtend()
        self.n_ctx_requested = n_ctx  # llama.cpp rounds n_ctx up to a multiple of 256
        kwargs.setdefault("flash_attn", True)

        super().__init__(model_path, *args, **kwargs)
        # llama-cpp-python refuses prompts and clips completions against _n_ctx: make that the
        # context that was asked for (and checked against Self-Extend's reach), not llama.cpp's
        # context rounded up to a multiple of 256
        self._n_ctx = min(n_ctx, self.n_ctx())

        _native.llama_set_self_extend_exact_rewind(self._ctx.ctx, grp_attn_rewind)
        if self_extend.enabled:
            self._apply(self_extend)
            how = "chose" if grp_attn_n == "auto" else "uses"
            logger.info("Self-Extend %s grp_attn_n=%d grp_attn_w=%d for n_ctx=%d (trained on %d, reach %d)",
                        how, self_extend.group_size, self_extend.neighbor_window, n_ctx, info.n_ctx_train,
                        settings.max_context(info.n_ctx_train, self_extend))
        elif n_ctx > info.n_ctx_train:
            logger.warning("n_ctx=%d is longer than the %d tokens %s was trained on, and Self-Extend is off: "
                           "past %d tokens the output degrades; pass grp_attn_n='auto' (or grp_attn_n=G, "
                           "grp_attn_w=W) to extend the context", n_ctx, info.n_ctx_train,
                           info.path.name, info.n_ctx_train)

    def generate(self, tokens, *args, **kwargs):
        for token in super().generate(tokens, *args, **kwargs):
            yield token
            # llama-cpp-python lets a few tokens past its max_tokens clip while it completes a
            # UTF-8 character; they would be evaluated past the context (and Self-Extend's reach)
            if self.n_tokens + 1 >= self._n_ctx:
                return

    def set_self_extend(self, group_size: int, neighbor_window: int) -> None:
        """Change G and W on the live context; cached tokens are kept (and re-rotated if G changes), unless
        the change would give a LongRoPE model (Phi-3) other RoPE factors: then ValueError, cache untouched."""
        self._apply(settings.decide(self.model_info, group_size, neighbor_window, self.n_ctx_requested))

    def _apply(self, setting: settings.SelfExtend) -> None:
        """Set decided settings on the context (llama_set_self_extend)."""
        group_size, window = setting.group_size, setting.neighbor_window
        status = _native.llama_set_self_extend(self._ctx.ctx, group_size, window)
        if status == _native.LLAMA_SELF_EXTEND_ERR_ROPE_FACTORS:
            raise ValueError(f"Self-Extend G={group_size}, W={window} would rotate the cached tokens of "
                             f"{self.model_info.path.name} with other LongRoPE factors (long or short) than they "
                             "were rotated with: clear the cache first (llama_memory_clear; Llama.reset() alone "
                             "keeps it), or switch before evaluating")
        if status == _native.LLAMA_SELF_EXTEND_ERR_UNSUPPORTED:
            raise ValueError(f"llama.cpp refused Self-Extend (G={group_size}, W={window}) for "
                             f"{self.model_info.path.name}: it needs a RoPE model with a plain or "
                             "sliding-window (iSWA) KV cache, not a recurrent or hybrid memory")
        if status != _native.LLAMA_SELF_EXTEND_OK:  # LLAMA_SELF_EXTEND_ERR_INVALID: its log says which
            raise ValueError(f"llama.cpp refused Self-Extend (G={group_size}, W={window}) for "
                             f"{self.model_info.path.name} as invalid values (status {status})")
        self.self_extend = setting

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have raised before llama_cpp.Llama set it up
            super().close()

    @property
    def grp_attn_n(self) -> int:
        return _native.llama_get_self_extend_group_size(self._ctx.ctx)

    @property
    def grp_attn_w(self) -> int:
        return _native.llama_get_self_extend_neighbor_window(self._ctx.ctx)

    @property
    def grp_attn_rewind(self) -> int:
        """How many of the most recently grouped tokens a rewind restores exactly (0 while Self-Extend is off)."""
        return _native.llama_get_self_extend_exact_rewind(self._ctx.ctx) if self.grp_attn_n > 1 else 0

    def n_ctx_train(self) -> int:
        return self.model_info.n_ctx_train
