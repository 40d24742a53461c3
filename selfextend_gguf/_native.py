"""Locate and load the Self-Extend-patched llama.cpp: its shared libraries and its programs.

The wheel installs the libraries (libllama, libggml*, built by CMakeLists.txt from the llama.cpp
that llama-cpp-python 0.3.36 vendors, plus ``patches/*.patch``) into ``llama_cpp/lib/``: the
folder from which llama-cpp-python's ``import llama_cpp`` loads its library. So any program in
the environment that imports ``llama_cpp`` gets the patched library; with Self-Extend off
(group size 1) it computes exactly what upstream computes. The programs llama-server, llama-cli
and llama-completion are installed into ``selfextend_gguf/bin/`` (see :func:`program_path`).

``SELFEXTEND_GGUF_LIB_PATH`` overrides both folders with one (a build tree's ``bin``, which
holds the libraries and the programs side by side), for developers testing another build. It
works when it is set before ``llama_cpp`` is first imported: a process loads one libllama.

Call :func:`require_self_extend_symbols` before using Self-Extend: it fails with an ImportError
when the loaded library lacks the patch's C API. The patch's functions are bound below, in
llama-cpp-python's style, with their return codes named (LLAMA_SELF_EXTEND_*); so is the capture
of llama.cpp's logs (:class:`LlamaLogCapture`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NewType

__all__ = ["ENV_LIB_PATH", "SELF_EXTEND_SYMBOLS", "PROGRAMS", "lib_dir", "load_llama_cpp",
           "program_path", "require_self_extend_symbols", "LlamaLogCapture",
           "LLAMA_SELF_EXTEND_OK", "LLAMA_SELF_EXTEND_ERR_INVALID", "LLAMA_SELF_EXTEND_ERR_UNSUPPORTED",
           "LLAMA_SELF_EXTEND_ERR_ROPE_FACTORS", "llama_set_self_extend", "llama_get_self_extend_group_size",
           "llama_get_self_extend_neighbor_window", "llama_get_self_extend_n_ctx_max",
           "llama_set_self_extend_exact_rewind", "llama_get_self_extend_exact_rewind"]

ENV_LIB_PATH = "SELFEXTEND_GGUF_LIB_PATH"

# llama.cpp's own programs, built from the same patched source (CMake option SELFEXTEND_BUILD_TOOLS)
PROGRAMS = ("llama-server", "llama-cli", "llama-completion")

_REINSTALL_HINT = (
    'reinstall with: CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install .'
    " (from the selfextend-gguf source tree)"
)


def _libllama_name() -> str:
    if sys.platform == "win32":
        return "llama.dll"
    if sys.platform == "darwin":
        return "libllama.dylib"
    return "libllama.so"


def lib_dir() -> Path:
    """The folder holding the patched libllama (and libggml*): $SELFEXTEND_GGUF_LIB_PATH, else the
    installed llama_cpp package's ``lib``. Raises FileNotFoundError when it has no libllama."""
    override = os.environ.get(ENV_LIB_PATH)
    if override:
        folder = Path(override).expanduser().resolve()
        where = f"{ENV_LIB_PATH}={override}"
    else:
        spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"llama-cpp-python (the llama_cpp package) is not installed; {_REINSTALL_HINT}")
        folder = Path(list(spec.submodule_search_locations)[0]).resolve() / "lib"
        where = "the llama_cpp package"
    if not (folder / _libllama_name()).is_file():
        raise FileNotFoundError(f"no {_libllama_name()} in {folder} ({where}); {_REINSTALL_HINT}, or set "
                                f"{ENV_LIB_PATH} to a build tree's bin folder")
    return folder


def program_path(name: str) -> Path:
    """The path of one of llama.cpp's programs (PROGRAMS) built from the patched source."""
    if name not in PROGRAMS:
        raise ValueError(f"unknown program {name!r}; the package ships {', '.join(PROGRAMS)}")
    override = os.environ.get(ENV_LIB_PATH)
    if override:
        folders = [Path(override).expanduser().resolve()]
    else:
        folders = _installed_program_dirs()
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is not installed (looked in {', '.join(map(str, folders))}): it is built "
                            f"unless CMAKE_ARGS has -DSELFEXTEND_BUILD_TOOLS=OFF; {_REINSTALL_HINT}")


def _installed_program_dirs() -> list[Path]:
    """selfextend_gguf/bin: next to this module (a wheel install; an editable install's __path__ spans
    the checkout and site-packages), and where the installed distribution put it (this module
    imported from a source checkout, e.g. by the tests, while the package is installed)."""
    package = sys.modules[__package__ or "selfextend_gguf"]
    folders = [Path(entry).resolve() / "bin" for entry in package.__path__]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        for file in distribution("selfextend-gguf").files or []:
            if file.name in PROGRAMS and file.parent.as_posix() == "selfextend_gguf/bin":  # not the console scripts
                folders.append(Path(str(file.locate())).resolve().parent)
    except (ImportError, PackageNotFoundError):
        pass
    return list(dict.fromkeys(folders))


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_llama_cpp() -> ModuleType:
    """Import ``llama_cpp`` bound to the patched library and return the module.

    Raises ImportError when the library is missing, fails to load, or when ``llama_cpp`` was
    already imported with a different library.
    """
    try:
        folder = lib_dir()
    except FileNotFoundError as e:
        raise ImportError(str(e)) from e
    expected = folder / _libllama_name()

    already = "llama_cpp.llama_cpp" in sys.modules
    if not already and os.environ.get(ENV_LIB_PATH):
        os.environ["LLAMA_CPP_LIB_PATH"] = str(folder)
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as bindings
    except (OSError, RuntimeError) as e:  # the library failed to load
        raise ImportError(f"llama_cpp could not load {expected}: {e}. {_REINSTALL_HINT}") from e

    loaded = getattr(getattr(bindings, "_lib", None), "_name", None) or "?"
    if not _same_file(loaded, expected):
        raise ImportError(
            f"llama_cpp uses {loaded}, not the patched {expected}. A process loads one libllama: unset "
            f"LLAMA_CPP_LIB_PATH (use {ENV_LIB_PATH} to pick another build, before anything imports llama_cpp)."
        )
    _register_signatures(bindings._lib)
    return llama_cpp


def _register_signatures(lib: ctypes.CDLL) -> None:
    """Declare argtypes/restype of the patch's functions that ``lib`` exports."""
    for name, (argtypes, restype) in _PROTOTYPES.items():
        fn = getattr(lib, name, None)  # CDLL caches it: settings persist
        if fn is not None:
            fn.argtypes = argtypes
            fn.restype = restype


_self_extend_library: ctypes.CDLL | None = None  # the checked library, once require_self_extend_symbols found it


def require_self_extend_symbols() -> ctypes.CDLL:
    """Load llama_cpp (if needed) and check the Self-Extend C API is there.

    Returns the loaded library (``llama_cpp.llama_cpp._lib``) with the functions' signatures
    declared. Raises ImportError otherwise.
    """
    global _self_extend_library
    if _self_extend_library is not None:
        return _self_extend_library
    llama_cpp = load_llama_cpp()
    lib = llama_cpp.llama_cpp._lib
    missing = [n for n in SELF_EXTEND_SYMBOLS if getattr(lib, n, None) is None]
    if missing:
        raise ImportError(
            f"{lib._name} lacks the Self-Extend patch's symbol(s) {', '.join(missing)}:"
            " it was built without (all of) patches/*.patch, or from an older"
            f" checkout; {_REINSTALL_HINT}."
        )
    _self_extend_library = lib
    return lib


# ----------------------------------------------------------------------------- the patch's C API
#
# Bound as llama-cpp-python binds llama.h (llama_cpp/llama_cpp.py): each function's C declaration,
# its ctypes prototype, and a Python function with the same name, typed arguments and llama.h's
# comment. llama_cpp binds its functions when it is imported; these bind on their first call, so that
# importing this module loads no library (`selfextend-gguf info` and `serve` never load it).
# The declarations are llama.h's (patches/0010-self-extend-attention.patch).

# struct llama_context *, as llama_cpp declares it: its type, and its ctypes type
llama_context_p = NewType("llama_context_p", int)
llama_context_p_ctypes = ctypes.c_void_p

# What llama_set_self_extend returns (llama.h's enum llama_self_extend_result):
LLAMA_SELF_EXTEND_OK = 0
LLAMA_SELF_EXTEND_ERR_INVALID = -1       # group_size < 1, neighbor_window < 1 with group_size > 1, or
                                         # neighbor_window below the model's sliding window
LLAMA_SELF_EXTEND_ERR_UNSUPPORTED = -2   # the model or its memory does not support it: it needs a RoPE
                                         # model with a KV cache (plain or iSWA)
LLAMA_SELF_EXTEND_ERR_ROPE_FACTORS = -3  # tokens are cached and the change would rotate them with
                                         # other RoPE factors (LongRoPE: Phi-3); clear the memory first
# llama_set_self_extend_exact_rewind returns LLAMA_SELF_EXTEND_OK, or LLAMA_SELF_EXTEND_ERR_INVALID for n_tokens < -1

_PROTOTYPES: dict[str, tuple[list, type]] = {}  # C name -> (argtypes, restype)


def _ctypes_function(name: str, argtypes: list, restype):
    """llama_cpp's ``ctypes_function`` decorator, for a library that is loaded on the first call."""
    _PROTOTYPES[name] = (argtypes, restype)

    def decorator(signature):
        @functools.wraps(signature)
        def call(*args):
            return getattr(require_self_extend_symbols(), name)(*args)
        return call
    return decorator


# LLAMA_API int32_t llama_set_self_extend(struct llama_context * ctx, int32_t group_size, int32_t neighbor_window);
@_ctypes_function("llama_set_self_extend", [llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32)
def llama_set_self_extend(ctx: llama_context_p, group_size: int, neighbor_window: int, /) -> int:
    """Attention between a query at position q and a key at position k uses the normal positions when
    q - k < neighbor_window, and the grouped positions q/group_size + neighbor_window - neighbor_window/group_size
    and k/group_size otherwise (integer division). group_size == 1 turns it off. Cached tokens are kept,
    and re-rotated if the group size changes. Returns one of the LLAMA_SELF_EXTEND_* codes above."""


# LLAMA_API int32_t llama_get_self_extend_group_size(const struct llama_context * ctx);
@_ctypes_function("llama_get_self_extend_group_size", [llama_context_p_ctypes], ctypes.c_int32)
def llama_get_self_extend_group_size(ctx: llama_context_p, /) -> int:
    """The group size G (1: Self-Extend is off)."""


# LLAMA_API int32_t llama_get_self_extend_neighbor_window(const struct llama_context * ctx);
@_ctypes_function("llama_get_self_extend_neighbor_window", [llama_context_p_ctypes], ctypes.c_int32)
def llama_get_self_extend_neighbor_window(ctx: llama_context_p, /) -> int:
    """The neighbor window W (0 while Self-Extend is off)."""


# LLAMA_API int32_t llama_get_self_extend_n_ctx_max(const struct llama_context * ctx);
@_ctypes_function("llama_get_self_extend_n_ctx_max", [llama_context_p_ctypes], ctypes.c_int32)
def llama_get_self_extend_n_ctx_max(ctx: llama_context_p, /) -> int:
    """The longest sequence the settings reach: its largest grouped position stays below the trained
    context (n_ctx_train when Self-Extend is off)."""


# LLAMA_API int32_t llama_set_self_extend_exact_rewind(struct llama_context * ctx, int32_t n_tokens);
@_ctypes_function("llama_set_self_extend_exact_rewind", [llama_context_p_ctypes, ctypes.c_int32], ctypes.c_int32)
def llama_set_self_extend_exact_rewind(ctx: llama_context_p, n_tokens: int, /) -> int:
    """Exact rewinds: keep the K that the n_tokens most recently grouped tokens of each sequence had at
    their normal positions, so that rewinding a sequence by up to n_tokens leaves bit for bit the cache a
    fresh context fed the same tokens holds. -1 (the default): an eighth of a sequence's context, at
    least 512 tokens; 0: none. Returns LLAMA_SELF_EXTEND_OK, or LLAMA_SELF_EXTEND_ERR_INVALID for
    n_tokens < -1."""


# LLAMA_API int32_t llama_get_self_extend_exact_rewind(const struct llama_context * ctx);
@_ctypes_function("llama_get_self_extend_exact_rewind", [llama_context_p_ctypes], ctypes.c_int32)
def llama_get_self_extend_exact_rewind(ctx: llama_context_p, /) -> int:
    """The exact rewind's tokens per sequence."""


SELF_EXTEND_SYMBOLS = tuple(_PROTOTYPES)


# ----------------------------------------------------------------------------- llama.cpp's logs

GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


class LlamaLogCapture:
    """llama.cpp's logs, kept off the terminal: install() points llama_log_set at a callback that drops
    them and keeps the errors in ``errors``, to explain a failure (llama-cpp-python prints llama.cpp's
    warnings even with verbose=False). llama_log_set is process-wide: the last install() wins."""

    _installed = None  # the callback llama.cpp now holds: kept alive here, or ctypes would free it

    def __init__(self):
        self.errors: list[str] = []

    def install(self) -> None:
        llama_cpp = load_llama_cpp()

        @llama_cpp.llama_log_callback
        def keep_errors(level, text, user_data):
            if level == GGML_LOG_LEVEL_ERROR:
                self.errors.append(text.decode("utf-8", errors="replace").strip())

        LlamaLogCapture._installed = keep_errors
        llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))

    @property
    def last_error(self) -> str | None:
        return self.errors[-1] if self.errors else None
