"""Saved states: a context's KV cache and what it was computed with, in one file, without pickle.

A state file is a zip archive of numpy arrays (numpy.savez; read back with allow_pickle=False):

    meta         a JSON string: format, model (file name and size), n_ctx, grp_attn_n, grp_attn_w,
                 n_tokens, the sha256 of the three arrays below, and the caller's own fields
                 (the chat keeps its documents and conversation there)
    input_ids    int32 [n_tokens]            the tokens the cache holds
    scores       float32 [rows, n_vocab]     llama-cpp-python's logits rows (the last row only,
                                             unless the context keeps every row, logits_all)
    llama_state  uint8 [bytes]               llama_state_get_data: the KV cache itself

read() checks all of it before anything touches a context: a truncated or edited file, or one of
another format, raises StateFileError; check() refuses another model or other settings, saying
which. So a failed load leaves the session as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "selfextend-gguf state 2"
SETTINGS = ("model", "model_size", "n_ctx", "grp_attn_n", "grp_attn_w")  # what a state must match to load


class StateFileError(ValueError):
    """A state file that cannot be read, or does not belong to this model and these settings."""


@dataclass
class SavedState:
    meta: dict
    input_ids: np.ndarray
    scores: np.ndarray
    llama_state: bytes


def settings_of(llm, n_ctx: int) -> dict:
    """What a state of this context records (selfextend_gguf.Llama; n_ctx: the context asked for)."""
    return {"model": llm.model_info.path.name, "model_size": llm.model_info.size_bytes, "n_ctx": n_ctx,
            "grp_attn_n": llm.grp_attn_n, "grp_attn_w": llm.grp_attn_w}


def _digest(meta: dict, *arrays: np.ndarray) -> str:
    """sha256 of the meta fields (but this one) and of the arrays."""
    sha = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def save(path, llm, n_ctx: int, extra: dict | None = None) -> dict:
    """Write llm's state to path (atomically: a reader never sees half a file); returns its meta."""
    state = llm.save_state()
    input_ids = np.asarray(state.input_ids[:state.n_tokens], dtype=np.int32)
    scores = np.asarray(state.scores, dtype=np.float32)
    if len(scores) > 1 and len(scores) < llm.n_ctx():  # no logits_all: n_batch scratch rows, keep the last
        scores = scores[-1:]
    llama_state = np.frombuffer(state.llama_state, dtype=np.uint8)
    meta = {"format": FORMAT, **settings_of(llm, n_ctx), "n_tokens": int(state.n_tokens), "seed": state.seed,
            **(extra or {})}
    meta["sha256"] = _digest(meta, input_ids, scores, llama_state)
    path = Path(path).expanduser()
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), input_ids=input_ids, scores=scores, llama_state=llama_state)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise StateFileError(f"cannot write {path}: {error.strerror or error}") from None
    return meta


def read(path) -> SavedState:
    """The state saved in path, checked whole (StateFileError if it is not one, or was cut or edited)."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            arrays = saved["input_ids"], saved["scores"], saved["llama_state"]
    except OSError as error:
        raise StateFileError(f"cannot read {path}: {error.strerror or error}") from None
    except (zipfile.BadZipFile, EOFError) as error:  # zip's own checks: a cut file, a changed byte (CRC)
        raise StateFileError(f"{path} is damaged: cut short or changed after it was saved ({error})") from None
    except (ValueError, KeyError, json.JSONDecodeError):
        raise StateFileError(f"{path} is not a selfextend-gguf state file") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateFileError(f"{path} is not a selfextend-gguf state file of this version ({FORMAT})")
    input_ids, scores, llama_state = arrays
    if meta.get("sha256") != _digest(meta, *arrays) or len(input_ids) != meta.get("n_tokens"):
        raise StateFileError(f"{path} is damaged: changed after it was saved (its contents do not match their checksum)")
    return SavedState(meta, input_ids, scores, llama_state.tobytes())


def check(saved: SavedState, llm, n_ctx: int, name: str) -> None:
    """Refuse a state of another model, or of other settings, naming the differences."""
    ours = settings_of(llm, n_ctx)
    if (saved.meta["model"], saved.meta["model_size"]) != (ours["model"], ours["model_size"]):
        raise StateFileError(f"{name} was saved with the model {saved.meta['model']}, and this one runs "
                             f"{ours['model']}: load it with --model {saved.meta['model']}")
    differences = [f"{key}={saved.meta[key]} (this chat: {ours[key]})" for key in SETTINGS[2:]
                   if saved.meta[key] != ours[key]]
    if differences:
        raise StateFileError(f"{name} was saved with other settings: {', '.join(differences)}; use the same "
                             "--ctx, --grp-attn-n and --grp-attn-w to load it")
    if saved.meta["n_tokens"] >= llm.n_ctx():
        raise StateFileError(f"{name} holds {saved.meta['n_tokens']} tokens, more than this context's {llm.n_ctx()}")


def restore(saved: SavedState, llm) -> None:
    """Load a checked state into llm (llama-cpp-python's LlamaState, rebuilt from the arrays)."""
    from .llama import llama_cpp

    input_ids = np.zeros(llm.n_ctx(), dtype=np.intc)
    input_ids[:len(saved.input_ids)] = saved.input_ids
    llm.load_state(llama_cpp.LlamaState(input_ids=input_ids, scores=saved.scores, n_tokens=saved.meta["n_tokens"],
                                        llama_state=saved.llama_state, llama_state_size=len(saved.llama_state),
                                        seed=saved.meta["seed"]))
