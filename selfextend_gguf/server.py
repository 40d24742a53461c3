"""OpenAI-compatible server with Self-Extend: llama-cpp-python's server running selfextend_gguf.Llama.

    python -m selfextend_gguf.server --model model.gguf --ctx 16384 --grp-attn-n auto
    selfextend-gguf serve ...          (the same options)

What is llama-cpp-python's (llama_cpp.server, unchanged): the routes (/v1/completions,
/v1/chat/completions, /v1/models, /v1/embeddings, /extras/tokenize, ...), streaming, the API key
check, the request lock (requests are answered one at a time, in order), the model loader,
prefix reuse between requests, the config file format.

What this module adds:
  * the model: the stock loader, running with selfextend_gguf.Llama instead of llama_cpp.Llama;
    grp_attn_n / grp_attn_w are model settings (command line or config file);
  * the context limit: a prompt that does not fit the n_ctx that was asked for gets a 400 that
    says the limit in tokens, streaming or not, before anything is evaluated, and completions
    stop at that limit. (llama.cpp rounds the context up to a multiple of 256, past what
    Self-Extend may cover; stock llama-cpp-python then answers such prompts with a 500, or an
    empty 200 stream, and can generate past the context);
  * malformed or mistyped request bodies on the completion routes get 422 (stock: 500);
  * GET /v1/selfextend: the settings in force and a count of evaluated tokens;
  * POST /v1/selfextend/state/save and /load {"name": ...}: the context (e.g. a long document
    already evaluated) saved to / restored from --state-dir, by name only: clients never give
    paths;
  * defaults for a local server: loopback, no cross-origin (CORS) access, requests queued rather
    than interrupted, logits kept for the last token only (for every position of a 16k context
    they take GBs).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import types
from pathlib import Path
from typing import List, Literal, Optional, Union

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware import Middleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette_context.middleware import RawContextMiddleware
from starlette_context.plugins import RequestIdPlugin

from . import __version__, settings
from .llama import Llama, llama_cpp  # first: points llama_cpp at the patched library
from .server_settings import DEFAULT_HOST, MODEL_OPTIONS, SERVER_OPTIONS, add_serve_arguments

import llama_cpp.server.app as stock_app  # noqa: E402  (after .llama, as are the next three)
from llama_cpp.server.model import LlamaProxy  # noqa: E402
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest  # noqa: E402

__all__ = ["add_serve_arguments", "serve", "main", "create_app", "ServerLlama",
           "SelfExtendModelSettings", "SelfExtendServerSettings", "SelfExtendConfigFile"]


# ---------------------------------------------------------------------------------------------
# Settings: llama-cpp-python's, plus Self-Extend
# ---------------------------------------------------------------------------------------------

class SelfExtendModelSettings(ModelSettings):
    grp_attn_n: Union[int, Literal["auto"]] = Field(
        default="auto", description="Self-Extend group size G: 'auto' = on, with G and W chosen, when "
                                    "n_ctx is longer than the trained context; 1 = off.")
    grp_attn_w: Optional[int] = Field(
        default=None, ge=1, description="Self-Extend neighbor window W (default: min(1024, trained/8)).")
    # stock defaults changed for long contexts: logits for every position cost n_ctx * n_vocab * 4
    # bytes (6 GB for 32k tokens and a 49k vocabulary); only logprobs requests need them
    logits_all: bool = Field(default=False, description="Keep logits for every position (logprobs).")
    verbose: bool = Field(default=False, description="Print llama.cpp's logs.")


class SelfExtendServerSettings(ServerSettings):
    host: str = Field(default=DEFAULT_HOST, description="Listen address (loopback by default).")
    interrupt_requests: bool = Field(
        default=False, description="Cut a stream short when another request is waiting.")
    state_dir: Optional[str] = Field(
        default=None, description="Directory for /v1/selfextend/state/{save,load}; unset = disabled.")


class SelfExtendConfigFile(SelfExtendServerSettings):
    """llama-cpp-python's config file format (ConfigFileSettings) with our model settings."""
    models: List[SelfExtendModelSettings] = Field(min_length=1, description="Model configs")


def read_config_file(path: str) -> SelfExtendConfigFile:
    """A JSON or YAML config file, as llama-cpp-python's server reads it."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml
        return SelfExtendConfigFile.model_validate(yaml.safe_load(text))
    return SelfExtendConfigFile.model_validate_json(text)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class PromptMeasured(Exception):
    def __init__(self, n_tokens: int):
        super().__init__(n_tokens)
        self.n_tokens = n_tokens


class ServerLlama(Llama):
    """selfextend_gguf.Llama as the server runs it.

    * The context limit is the n_ctx that was asked for (the one Self-Extend was checked
      against), not llama.cpp's rounded-up context: llama-cpp-python refuses prompts and clips
      completions against self._n_ctx.
    * count_prompt_tokens() runs llama-cpp-python's own prompt building (chat template,
      tokenization, BOS) for a request and stops before evaluating anything.
    * tokens_evaluated counts the tokens llama.cpp evaluated (prefix reuse shows here).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context_limit = self._n_ctx  # the n_ctx asked for, see Llama.__init__
        self.tokens_evaluated = 0
        self._measuring = False

    def eval(self, tokens):
        super().eval(tokens)
        self.tokens_evaluated += len(tokens)

    def generate(self, tokens, *args, **kwargs):
        if self._measuring:
            raise PromptMeasured(len(tokens))
        yield from super().generate(tokens, *args, **kwargs)

    def count_prompt_tokens(self, create, **request) -> int:
        """Prompt tokens of create(self, **request) (create_completion or create_chat_completion)."""
        seed, limit = self._seed, self._n_ctx
        self._measuring, self._n_ctx = True, sys.maxsize  # measure here, judge in the caller
        try:
            create(self, **request)
        except PromptMeasured as measured:
            return measured.n_tokens
        finally:
            self._measuring, self._n_ctx, self._seed = False, limit, seed
        raise RuntimeError("llama-cpp-python built no prompt for this request")

    def describe(self) -> dict:
        setting = self.self_extend
        return {"model": self.model_info.path.name, "n_ctx": self.context_limit,
                "n_ctx_train": self.model_info.n_ctx_train, "grp_attn_n": self.grp_attn_n,
                "grp_attn_w": self.grp_attn_w if setting.enabled else None,
                "max_context": settings.max_context(self.model_info.n_ctx_train, setting),
                "tokens_cached": self.n_tokens, "tokens_evaluated": self.tokens_evaluated}


def _stock_loader(llama_class):
    """llama-cpp-python's load_llama_from_model_settings (chat formats and handlers, kv
    overrides, LoRA, caches, draft model...), unchanged except that the name `llama_cpp.Llama`
    in its body means llama_class: the function's code runs with a copy of its globals in which
    `llama_cpp` is a namespace like the llama_cpp module but for that one name."""
    stock = LlamaProxy.load_llama_from_model_settings
    with_our_llama = types.SimpleNamespace(**{**vars(llama_cpp), "Llama": llama_class})
    return types.FunctionType(stock.__code__, {**stock.__globals__, "llama_cpp": with_our_llama})


class SelfExtendLlamaProxy(LlamaProxy):
    @staticmethod
    def load_llama_from_model_settings(model: SelfExtendModelSettings) -> ServerLlama:
        if model.hf_model_repo_id is not None:
            raise ValueError("hf_model_repo_id is not supported: set `model` to a local GGUF file")
        if model.clip_model_path is not None:
            raise ValueError("multimodal models (clip_model_path) are not supported with Self-Extend")
        llama_class = functools.partial(ServerLlama, grp_attn_n=model.grp_attn_n,
                                        grp_attn_w=model.grp_attn_w)
        return _stock_loader(llama_class)(model)


# ---------------------------------------------------------------------------------------------
# Routes: the completion routes are checked here, then answered by llama-cpp-python's
# ---------------------------------------------------------------------------------------------

router = APIRouter(dependencies=[Depends(stock_app.authenticate)])
model_lock = contextlib.asynccontextmanager(stock_app.get_llama_proxy)  # the stock request lock

# what the stock routes leave out of the request before calling the model, plus what needs
# converting first and plays no part in the prompt
NOT_PROMPT = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "logit_bias", "grammar"}


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


async def check_prompt_fits(body, create, param: str) -> JSONResponse | None:
    """None if the prompt leaves room for a generated token, else the 400 to answer."""
    async with model_lock() as proxy:
        llama: ServerLlama = proxy(body.model)
        request = body.model_dump(exclude=NOT_PROMPT) | {"stream": False}
        try:
            n_prompt = await run_in_threadpool(llama.count_prompt_tokens, create, **request)
        except ValueError as error:  # e.g. logprobs without logits_all, unknown tool
            return openai_error(400, str(error), param=param)
        info = llama.describe()
    if n_prompt < info["n_ctx"]:
        return None
    limit = info["n_ctx"]
    if info["grp_attn_n"] > 1:
        how = (f"Self-Extend grp_attn_n={info['grp_attn_n']}, grp_attn_w={info['grp_attn_w']} on a "
               f"model trained on {info['n_ctx_train']} tokens")
        if info["max_context"] > limit:
            how += f"; these settings reach {info['max_context']} tokens with a larger --ctx"
    else:
        how = f"Self-Extend off, model trained on {info['n_ctx_train']} tokens"
    message = (f"This model's maximum context length is {limit} tokens ({how}). Your prompt has "
               f"{n_prompt} tokens; it must be shorter than {limit} tokens to leave room for the "
               f"completion. Please shorten it.")
    return openai_error(400, message, param=param, code="context_length_exceeded")


@router.post("/v1/completions", include_in_schema=False)  # /docs shows the stock route: same body
async def create_completion(request: Request, body: CreateCompletionRequest):
    if isinstance(body.prompt, list):  # as the stock route does
        if len(body.prompt) > 1:
            return openai_error(400, "one prompt per request", param="prompt")
        body.prompt = body.prompt[0] if body.prompt else ""
    too_long = await check_prompt_fits(body, llama_cpp.Llama.create_completion, "prompt")
    return too_long or await stock_app.create_completion(request, body)


@router.post("/v1/chat/completions", include_in_schema=False)
async def create_chat_completion(request: Request, body: CreateChatCompletionRequest):
    too_long = await check_prompt_fits(body, llama_cpp.Llama.create_chat_completion, "messages")
    return too_long or await stock_app.create_chat_completion(request, body)


# llama-cpp-python's tokenizer route, also under /v1
router.add_api_route("/v1/tokenize", stock_app.tokenize, methods=["POST"], summary="Tokenize")


@router.get("/v1/selfextend", summary="Self-Extend settings")
async def self_extend_info(model: Optional[str] = None):
    """G, W, the context limit and how far the settings reach, and token counters."""
    async with model_lock() as proxy:
        return proxy(model).describe()


STATE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
STATE_FORMAT = 1


class StateRequest(BaseModel):
    name: str = Field(pattern=STATE_NAME, description="File name (letters, digits, . _ -) in --state-dir")
    model: Optional[str] = None


def state_path(name: str) -> Path | None:
    state_dir = next(stock_app.get_server_settings()).state_dir
    return None if state_dir is None else Path(state_dir) / f"{name}.llama-state.npz"


def save_state(llama: ServerLlama, path: Path) -> dict:
    state = llama.save_state()
    meta = {"format": STATE_FORMAT, "model": llama.model_info.path.name,
            "model_size": llama.model_info.size_bytes, "n_tokens": state.n_tokens,
            "grp_attn_n": llama.grp_attn_n, "grp_attn_w": llama.grp_attn_w, "seed": state.seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), input_ids=state.input_ids[:state.n_tokens],
                 scores=state.scores, llama_state=np.frombuffer(state.llama_state, dtype=np.uint8))
    os.replace(partial, path)  # readers never see a half-written file
    return meta | {"bytes": path.stat().st_size}


def load_state(llama: ServerLlama, path: Path) -> dict:
    """Restore a saved context; ValueError if it does not belong to this model and settings."""
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path.name} has an unknown format")
        if (meta["model"], meta["model_size"]) != (llama.model_info.path.name, llama.model_info.size_bytes):
            raise ValueError(f"{path.name} was saved from {meta['model']}, not {llama.model_info.path.name}")
        n_tokens = meta["n_tokens"]
        if n_tokens >= llama.context_limit:
            raise ValueError(f"{path.name} holds {n_tokens} tokens; this server's context is "
                             f"{llama.context_limit}")
        scores = saved["scores"]
        if scores.shape != llama.scores[:n_tokens].shape:
            raise ValueError(f"{path.name} was saved with another logits_all setting")
        input_ids = np.zeros_like(llama.input_ids)
        input_ids[:n_tokens] = saved["input_ids"]
        llama_state = saved["llama_state"].tobytes()
    # (a state saved with other G/W is fine: llama.cpp re-positions the cached keys on load)
    llama.load_state(llama_cpp.LlamaState(input_ids=input_ids, scores=scores, n_tokens=n_tokens,
                                          llama_state=llama_state, llama_state_size=len(llama_state),
                                          seed=meta["seed"]))
    return meta


@router.post("/v1/selfextend/state/save", summary="Save the context to --state-dir")
async def save_state_route(body: StateRequest):
    path = state_path(body.name)
    if path is None:
        return openai_error(403, "saving states is disabled: start the server with --state-dir DIR")
    async with model_lock() as proxy:
        meta = await run_in_threadpool(save_state, proxy(body.model), path)
    return {"name": body.name, **meta}


@router.post("/v1/selfextend/state/load", summary="Load a context saved in --state-dir")
async def load_state_route(body: StateRequest):
    path = state_path(body.name)
    if path is None:
        return openai_error(403, "loading states is disabled: start the server with --state-dir DIR")
    if not path.is_file():
        return openai_error(404, f"no saved state named {body.name!r}", param="name")
    async with model_lock() as proxy:
        llama = proxy(body.model)
        try:
            meta = await run_in_threadpool(load_state, llama, path)
        except (ValueError, RuntimeError) as error:
            return openai_error(409, str(error), param="name")
        return {"name": body.name, **meta, "grp_attn_n": llama.grp_attn_n, "grp_attn_w": llama.grp_attn_w}


# ---------------------------------------------------------------------------------------------
# The app and the command line
# ---------------------------------------------------------------------------------------------

def create_app(server: SelfExtendServerSettings, models: List[SelfExtendModelSettings]) -> FastAPI:
    """llama-cpp-python's routes, ours first (the first route that matches a request answers it,
    so ours replace the stock completion routes), with our model proxy. Loads the first model.
    Like llama-cpp-python's create_app, but without its allow-all CORS: a web page from another
    origin cannot read the answers of this (by default key-less) local server."""
    stock_app.set_server_settings(server)
    app = FastAPI(title="selfextend-gguf", version=__version__, root_path=server.root_path,
                  middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))])
    app.include_router(router)
    app.include_router(stock_app.router)
    stock_app._llama_proxy = SelfExtendLlamaProxy(models)  # what the stock get_llama_proxy() yields
    if server.disable_ping_events:
        stock_app.set_ping_message_factory(lambda: bytes())

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):  # as the stock routes answer
        return openai_error(500, str(error), kind="internal_server_error")

    return app


def settings_from_args(args: argparse.Namespace):
    """(server settings, [model settings]) from the parsed command line."""
    given = {name: value for name, value in vars(args).items() if value is not None}
    if args.config:
        mixed = [flag for name, flag in MODEL_OPTIONS.items() if name in given]
        if mixed:
            raise ValueError(f"{', '.join(mixed)}: with --config, model settings go in the config file")
        config = read_config_file(args.config)
        overrides = {name: given[name] for name in SERVER_OPTIONS if name in given}
        server = SelfExtendServerSettings.model_validate(config.model_dump(exclude={"models"}) | overrides)
        return server, config.models
    if "model" not in given:
        from .models import default_model_path
        given["model"] = str(default_model_path())
    server = SelfExtendServerSettings(**{name: given[name] for name in SERVER_OPTIONS if name in given})
    model = {name: given[name] for name in MODEL_OPTIONS if name in given}
    if "n_threads" in model:
        model["n_threads_batch"] = model["n_threads"]
    return server, [SelfExtendModelSettings(**model)]


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted. Returns the exit status (2: bad settings or model)."""
    try:
        server, models = settings_from_args(args)
        app = create_app(server, models)
    except (ValueError, OSError) as error:  # includes pydantic's ValidationError, missing files
        print(f"selfextend-gguf serve: error: {error}", file=sys.stderr)
        return 2
    if server.host not in ("127.0.0.1", "localhost", "::1") and server.api_key is None:
        print(f"selfextend-gguf serve: warning: listening on {server.host} without --api-key: "
              "anyone who can reach it can use the model", file=sys.stderr)
    uvicorn.run(app, host=server.host, port=server.port,
                ssl_keyfile=server.ssl_keyfile, ssl_certfile=server.ssl_certfile)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfextend_gguf.server",
                                     description="OpenAI-compatible server with Self-Extend.")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
