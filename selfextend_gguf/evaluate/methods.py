"""The long-context methods, each a function that returns a ready `Runner`.

    vanilla            RoPE positions 0..n-1, past the trained context
    sink               keep the first n_sink tokens and the most recent ones that fit the trained
                       context, positions contiguous (llama.cpp's context shift, StreamingLLM)
    linear, yarn       llama.cpp's own RoPE scaling (rope_freq_scale = trained / n_ctx), no tuning
    chunked            upstream llama-completion --grp-attn-n G --grp-attn-w W: the KV cache's
                       positions are rewritten with llama_memory_seq_add / seq_div before every
                       batch of n_batch tokens (tools/completion/completion.cpp)
    exact              this project's exact Self-Extend (selfextend_gguf.Llama)

`make("exact-g4-w1024", model_path, length)` builds one from its name (see names.py).

A Runner drives llama_decode itself (one code path for every method, logits of any rows) and
re-uses the longest common prefix of the previous prompt still in the KV cache.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..gguf_info import read_model_info
from ..llama import Llama, llama_cpp
from .names import CHUNKED_DEFAULT, N_BATCH, parse

N_UBATCH = 512        # llama-completion's default physical batch (n_batch: names.N_BATCH)
N_SINK = 4            # StreamingLLM's attention sinks


class Runner:
    """One model, one context, one method. prefill() then generate(), or nll_of_last()."""

    reuses_prefix = True

    def __init__(self, name: str, llm: Llama, n_batch: int = N_BATCH):
        self.name = name
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llm.n_vocab()
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.cached: list = []    # the tokens in the KV cache, in order
        self.n_past = 0           # the position the next token gets

    # ------------------------------------------------------------------ what methods override
    def prepare(self, tokens: list) -> list:
        """The tokens the model actually reads (sink drops the middle)."""
        return tokens

    def before_batch(self) -> None:
        """Called before every llama_decode (chunked rewrites positions here)."""

    # ------------------------------------------------------------------ the common machinery
    def forget_after(self, n_keep: int) -> None:
        if n_keep == 0:
            llama_cpp.llama_memory_clear(self.memory, True)
        else:
            llama_cpp.llama_memory_seq_rm(self.memory, 0, n_keep, -1)
        self.cached = self.cached[:n_keep]
        self.n_past = n_keep

    def decode(self, tokens: list, logits_from: int) -> np.ndarray:
        """Feed tokens in batches of n_batch; return the logits of rows logits_from.. (float32)."""
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            self.before_batch()
            chunk = tokens[start:start + self.n_batch]
            batch = self.batch
            batch.n_tokens = len(chunk)
            n_out = 0
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = start + i >= logits_from
                n_out += start + i >= logits_from
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status} ({self.name}, "
                                   f"{len(self.cached) + len(chunk)} tokens)")
            if n_out:
                pointer = llama_cpp.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(n_out * self.n_vocab,))
                            .reshape(n_out, self.n_vocab).copy())
            self.n_past += len(chunk)
            self.cached += chunk
        return np.concatenate(rows) if rows else np.zeros((0, self.n_vocab), np.float32)

    def prefill(self, tokens: list) -> np.ndarray:
        """Read the prompt; return the last row of logits. Keeps the common prefix cached."""
        tokens = self.prepare(tokens)
        common = 0
        if self.reuses_prefix:
            limit = min(len(self.cached), len(tokens) - 1)
            while common < limit and self.cached[common] == tokens[common]:
                common += 1
        self.forget_after(common)
        return self.decode(tokens[common:], len(tokens) - common - 1)[-1]

    def generate(self, tokens: list, n_new: int) -> list:
        """Greedy decoding of up to n_new tokens after the prompt (stops at end of generation)."""
        logits = self.prefill(tokens)
        out = []
        for _ in range(n_new):
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                break
            out.append(token)
            logits = self.decode([token], 0)[-1]
        return out

    def nll_of_last(self, tokens: list, n_last: int) -> np.ndarray:
        """Negative log-likelihood (nats) of each of the last n_last tokens, from a fresh context."""
        tokens = self.prepare(tokens)
        if n_last >= len(tokens):
            raise ValueError(f"n_last={n_last} needs more than {len(tokens)} tokens")
        self.forget_after(0)
        logits = self.decode(tokens, len(tokens) - n_last - 1)[:-1].astype(np.float64)
        targets = np.asarray(tokens[-n_last:])
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return log_z - logits[np.arange(n_last), targets]

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()


class SinkRunner(Runner):
    """StreamingLLM for a prefill: the first n_sink tokens plus the most recent ones."""

    def __init__(self, name, llm, keep: int, n_sink: int = N_SINK, n_batch: int = N_BATCH):
        super().__init__(name, llm, n_batch)
        self.keep, self.n_sink = keep, n_sink

    def prepare(self, tokens):
        if len(tokens) <= self.keep:
            return tokens
        return tokens[:self.n_sink] + tokens[len(tokens) - (self.keep - self.n_sink):]


class ChunkedRunner(Runner):
    """llama-completion's Self-Extend: before each batch, compress every full window of W
    positions behind n_past into W / G positions (literal port of completion.cpp; the pinned
    llama.cpp's seq_div rotates keys with the wrong sign, see reference.positions).

    Compressed positions cannot be cut back to a prefix, so prefix re-use goes through
    snapshots of the sequence state taken after every full batch of a prompt: a later prompt
    with the same first k * n_batch tokens restores one and decodes the same batches from there.
    """

    SNAPSHOT_BUDGET = 2 << 30    # bytes of snapshots kept; the largest are dropped first

    def __init__(self, name, llm, group_size: int, window: int, n_batch: int = N_BATCH):
        if window % group_size:
            raise ValueError(f"chunked Self-Extend needs W % G == 0 (G={group_size}, W={window}), "
                             "as llama-completion asserts")
        super().__init__(name, llm, n_batch)
        self.group_size, self.window = group_size, window
        self.ga_i = 0
        self.snapshots: dict = {}    # n_tokens -> (tokens, n_past, ga_i, state bytes)

    def forget_after(self, n_keep):
        super().forget_after(0)
        self.ga_i = 0

    def before_batch(self):
        G, W, mem = self.group_size, self.window, self.memory
        if G == 1:
            return
        while self.n_past >= self.ga_i + W:
            ib = (G * self.ga_i) // W
            bd = (W // G) * (G - 1)
            dd = (W // G) - ib * bd - W
            llama_cpp.llama_memory_seq_add(mem, 0, self.ga_i, self.n_past, ib * bd)
            llama_cpp.llama_memory_seq_div(mem, 0, self.ga_i + ib * bd, self.ga_i + ib * bd + W, G)
            llama_cpp.llama_memory_seq_add(mem, 0, self.ga_i + ib * bd + W, self.n_past + ib * bd, dd)
            self.n_past -= bd
            self.ga_i += W // G

    def prefill(self, tokens):
        restored = self._restore_longest(tokens)
        logits = None
        for start in range(restored, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            logits = self.decode(chunk, len(chunk) - 1)
            if len(chunk) == self.n_batch and start + len(chunk) < len(tokens):
                self._snapshot(tokens)
        return logits[-1]

    def _snapshot(self, tokens):
        n = len(self.cached)
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, 0)
        self.snapshots[n] = (tokens[:n], self.n_past, self.ga_i, buffer)
        while sum(len(s[3]) for s in self.snapshots.values()) > self.SNAPSHOT_BUDGET:
            del self.snapshots[max(self.snapshots)]

    def _restore_longest(self, tokens) -> int:
        """Restore the longest snapshot that is a prefix of tokens; return its length (0: none)."""
        for n in sorted(self.snapshots, reverse=True):
            saved, n_past, ga_i, buffer = self.snapshots[n]
            if n < len(tokens) and tokens[:n] == saved:
                self.forget_after(0)
                if llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(buffer), 0) == 0:
                    raise RuntimeError("llama_state_seq_set_data failed to restore a snapshot")
                self.cached, self.n_past, self.ga_i = list(saved), n_past, ga_i
                return n
        self.forget_after(0)
        return 0

    def close(self):
        self.snapshots.clear()
        super().close()


# ---------------------------------------------------------------------- one function per method

def _llama(model_path, n_ctx, n_threads, flash_attn, n_batch, verbose=False, n_gpu_layers=0, **kwargs) -> Llama:
    return Llama(str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                 n_batch=n_batch, n_ubatch=min(N_UBATCH, n_batch), flash_attn=flash_attn,
                 verbose=verbose, n_gpu_layers=n_gpu_layers, **kwargs)


# each method: (model_path, length, n_threads, flash_attn, n_batch, its own options, verbose,
# n_gpu_layers) -> Runner

def vanilla(model_path, length, n_threads=2, flash_attn=True, n_batch=N_BATCH, verbose=False, n_gpu_layers=0) -> Runner:
    return Runner("vanilla", _llama(model_path, length, n_threads, flash_attn, n_batch, verbose, n_gpu_layers), n_batch)


def sink(model_path, length, n_threads=2, flash_attn=True, n_batch=N_BATCH, n_sink=N_SINK, verbose=False, n_gpu_layers=0) -> Runner:
    n_train = read_model_info(model_path).n_ctx_train
    n_ctx = min(length, n_train)
    llm = _llama(model_path, n_ctx, n_threads, flash_attn, n_batch, verbose, n_gpu_layers)
    return SinkRunner("sink", llm, keep=n_ctx - 16, n_sink=n_sink, n_batch=n_batch)


def _rope_scaled(name, scaling_type, model_path, length, n_threads, flash_attn, n_batch, verbose, n_gpu_layers,
                 **extra):
    n_train = read_model_info(model_path).n_ctx_train
    scale = min(1.0, n_train / length)
    llm = _llama(model_path, length, n_threads, flash_attn, n_batch, verbose, n_gpu_layers, rope_scaling_type=scaling_type,
                 rope_freq_scale=scale, **extra)
    return Runner(name, llm, n_batch)


def linear(model_path, length, n_threads=2, flash_attn=True, n_batch=N_BATCH, verbose=False, n_gpu_layers=0) -> Runner:
    return _rope_scaled("linear", llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR, model_path, length,
                        n_threads, flash_attn, n_batch, verbose, n_gpu_layers)


def yarn(model_path, length, n_threads=2, flash_attn=True, n_batch=N_BATCH, verbose=False, n_gpu_layers=0) -> Runner:
    n_train = read_model_info(model_path).n_ctx_train
    return _rope_scaled("yarn", llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, model_path, length,
                        n_threads, flash_attn, n_batch, verbose, n_gpu_layers, yarn_orig_ctx=n_train)


def chunked(model_path, length, n_threads=2, flash_attn=True, n_batch=N_BATCH,
            group_size=CHUNKED_DEFAULT[0], window=CHUNKED_DEFAULT[1], verbose=False, n_gpu_layers=0) -> Runner:
    llm = _llama(model_path, length, n_threads, flash_attn, n_batch, verbose, n_gpu_layers)
    return ChunkedRunner(f"chunked-g{group_size}-w{window}", llm, group_size, window, n_batch)


def exact(model_path, length, n_threads=2, flash_attn=True, n_batch=N_BATCH,
          group_size="auto", window=None, verbose=False, n_gpu_layers=0) -> Runner:
    llm = _llama(model_path, length, n_threads, flash_attn, n_batch, verbose, n_gpu_layers, grp_attn_n=group_size,
                 grp_attn_w=window)
    name = "exact-auto" if group_size == "auto" else f"exact-g{group_size}-w{llm.grp_attn_w}"
    return Runner(name, llm, n_batch)


# names.METHODS -> the function that sets it up
BUILDERS = {"vanilla": vanilla, "sink": sink, "linear": linear, "yarn": yarn, "chunked": chunked, "exact": exact}


def make(name: str, model_path, length: int, n_threads: int = 2, flash_attn: bool = True,
         n_batch: int = N_BATCH, verbose: bool = False, n_gpu_layers: int = 0) -> Runner:
    """The runner of a method name (names.parse); verbose: llama.cpp's logs (bench_speed reads its
    buffer sizes there); n_gpu_layers: llama.cpp's (-1: every layer on the GPU)."""
    method, options = parse(name)
    runner = BUILDERS[method](model_path, length, n_threads=n_threads, flash_attn=flash_attn,
                              n_batch=n_batch, verbose=verbose, n_gpu_layers=n_gpu_layers, **options)
    runner.name = name
    return runner
