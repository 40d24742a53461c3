"""Locate and load the Self-Extend-patched llama.cpp shared libraries.

The wheel ships libllama/libggml* (built by CMakeLists.txt from the llama.cpp
that llama-cpp-python 0.3.36 vendors, plus ``patches/*.patch``) in
``selfextend_gguf/lib/``. llama-cpp-python's ``llama_cpp`` module loads its
library once, at import, from ``$LLAMA_CPP_LIB_PATH``; :func:`load_llama_cpp`
points that variable at our folder before the import.

Rules for callers:

* get ``llama_cpp`` through :func:`load_llama_cpp`, or at least call it before
  anything imports ``llama_cpp``;
* call :func:`require_self_extend_symbols` before using Self-Extend: it fails
  with an ImportError when the loaded library lacks the patch's C API.

``SELFEXTEND_GGUF_LIB_PATH`` overrides the folder (e.g. a build tree's
``build/<wheel tag>/bin``), for developers testing a fresh build.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Tuple

__all__ = [
    "ENV_LIB_PATH",
    "SELF_EXTEND_SYMBOLS",
    "lib_dir",
    "load_llama_cpp",
    "require_self_extend_symbols",
    "set_self_extend",
    "get_self_extend",
]

ENV_LIB_PATH = "SELFEXTEND_GGUF_LIB_PATH"

# The patch's C API (patches/0001-self-extend-api.patch, include/llama.h):
#   int32_t llama_set_self_extend(struct llama_context * ctx, int32_t group_size, int32_t neighbor_window);
#       0: ok, -1: invalid values, -2: the model or its memory does not support it
#   int32_t llama_get_self_extend_group_size(const struct llama_context * ctx);
#   int32_t llama_get_self_extend_neighbor_window(const struct llama_context * ctx);
_SIGNATURES = {
    "llama_set_self_extend": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32),
    "llama_get_self_extend_group_size": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_get_self_extend_neighbor_window": ([ctypes.c_void_p], ctypes.c_int32),
}
SELF_EXTEND_SYMBOLS = tuple(_SIGNATURES)

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


def _candidate_dirs() -> list[Path]:
    """Where to look, in order (the first folder holding libllama wins)."""
    override = os.environ.get(ENV_LIB_PATH)
    if override:
        return [Path(override).expanduser().resolve()]
    here = Path(__file__).resolve().parent
    dirs = [here / "lib"]  # a regular (wheel) install
    # Editable installs: the package's __path__ spans the source tree and the
    # site-packages folder that received the CMake-installed libraries.
    pkg = sys.modules.get(__package__ or "selfextend_gguf")
    for entry in getattr(pkg, "__path__", None) or []:
        dirs.append(Path(entry).resolve() / "lib")
    # Imported from a source checkout (e.g. tests putting the repo first on
    # sys.path) while the package is installed: the installed libraries.
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("selfextend-gguf")
        for f in dist.files or []:
            if f.name == _libllama_name() and f.parent.name == "lib":
                dirs.append(Path(str(dist.locate_file(f))).resolve().parent)
    except (ImportError, PackageNotFoundError):
        pass
    # Not installed at all: a build tree of this checkout (build/<wheel tag>/bin).
    # (build/unpatched is the tests' plain llama.cpp, never a candidate)
    dirs.extend(d for d in sorted((here.parent / "build").glob("*/bin")) if d.parent.name != "unpatched")
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def lib_dir() -> Path:
    """Return the folder holding the patched libllama (and libggml*).

    Raises FileNotFoundError when no candidate folder has the library.
    """
    dirs = _candidate_dirs()
    for d in dirs:
        if (d / _libllama_name()).is_file():
            return d
    where = ", ".join(str(d) for d in dirs)
    if os.environ.get(ENV_LIB_PATH):
        raise FileNotFoundError(
            f"{ENV_LIB_PATH}={os.environ[ENV_LIB_PATH]}: no {_libllama_name()} in {where}"
        )
    raise FileNotFoundError(
        f"The patched llama.cpp library ({_libllama_name()}) is not installed"
        f" (looked in {where}); {_REINSTALL_HINT}, or set {ENV_LIB_PATH} to a"
        " folder that has it (e.g. build/<wheel tag>/bin of a build tree)."
    )


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_llama_cpp() -> ModuleType:
    """Import ``llama_cpp`` bound to the patched library and return the module.

    Raises ImportError when the library is missing, fails to load, or when
    ``llama_cpp`` was already imported with a different library.
    """
    try:
        d = lib_dir()
    except FileNotFoundError as e:
        raise ImportError(str(e)) from e
    expected = d / _libllama_name()

    already = "llama_cpp.llama_cpp" in sys.modules
    if not already:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as bindings
    except (OSError, RuntimeError) as e:  # the library failed to load
        raise ImportError(
            f"llama_cpp could not load {expected}: {e}. {_REINSTALL_HINT}"
        ) from e

    loaded = getattr(getattr(bindings, "_lib", None), "_name", None) or "?"
    if not _same_file(loaded, expected):
        how = (
            "llama_cpp was imported before selfextend_gguf could point it at the"
            " patched library"
            if already
            else "llama_cpp did not load the library from LLAMA_CPP_LIB_PATH"
        )
        raise ImportError(
            f"{how}: it uses {loaded}, not {expected}. A process can load only one"
            " libllama: import selfextend_gguf (or call"
            " selfextend_gguf._native.load_llama_cpp()) before anything imports"
            " llama_cpp, and don't set LLAMA_CPP_LIB_PATH yourself (use"
            f" {ENV_LIB_PATH} to pick another build)."
        )
    _register_signatures(bindings._lib)
    return llama_cpp


def _register_signatures(lib: ctypes.CDLL) -> None:
    """Declare argtypes/restype of the patch's functions that ``lib`` exports."""
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name, None)  # CDLL caches it: settings persist
        if fn is not None:
            fn.argtypes = argtypes
            fn.restype = restype


def require_self_extend_symbols() -> ctypes.CDLL:
    """Load llama_cpp (if needed) and check the Self-Extend C API is there.

    Returns the loaded library (``llama_cpp.llama_cpp._lib``) with the
    functions' signatures declared. Raises ImportError otherwise.
    """
    llama_cpp = load_llama_cpp()
    lib = llama_cpp.llama_cpp._lib
    missing = [n for n in SELF_EXTEND_SYMBOLS if getattr(lib, n, None) is None]
    if missing:
        raise ImportError(
            f"{lib._name} lacks the Self-Extend patch's symbol(s) {', '.join(missing)}:"
            " it was built without (all of) patches/*.patch, or from an older"
            f" checkout; {_REINSTALL_HINT}."
        )
    return lib


def _ctx_pointer(ctx: Any) -> int:
    """A ``llama_context *`` from a Llama, a LlamaContext, or a raw pointer."""
    obj = ctx
    if hasattr(obj, "_ctx"):  # llama_cpp.Llama
        obj = obj._ctx
    if hasattr(obj, "ctx"):  # llama_cpp._internals.LlamaContext
        obj = obj.ctx
    if isinstance(obj, ctypes.c_void_p):
        obj = obj.value
    if not obj:
        raise ValueError(f"no llama_context pointer in {ctx!r} (closed or NULL?)")
    return int(obj)


def set_self_extend(ctx: Any, group_size: int, neighbor_window: int) -> None:
    """Call ``llama_set_self_extend(ctx, group_size, neighbor_window)``.

    ``ctx``: a ``llama_cpp.Llama``, its ``_ctx`` (LlamaContext) or a raw
    ``llama_context *``. group_size 1 turns Self-Extend off. Raises ValueError
    when the library rejects the values (-1), RuntimeError when the model or
    its memory does not support Self-Extend (-2).
    """
    lib = require_self_extend_symbols()
    g, w = int(group_size), int(neighbor_window)
    rc = lib.llama_set_self_extend(_ctx_pointer(ctx), g, w)
    if rc == -1:
        raise ValueError(f"invalid Self-Extend settings: group_size={g}, neighbor_window={w}")
    if rc == -2:
        raise RuntimeError("this model or its memory (KV cache) does not support Self-Extend")
    if rc != 0:
        raise RuntimeError(f"llama_set_self_extend returned {rc}")


def get_self_extend(ctx: Any) -> Tuple[int, int]:
    """Return ``(group_size, neighbor_window)`` as the context reports them."""
    lib = require_self_extend_symbols()
    p = _ctx_pointer(ctx)
    return (
        int(lib.llama_get_self_extend_group_size(p)),
        int(lib.llama_get_self_extend_neighbor_window(p)),
    )
