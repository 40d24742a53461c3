"""Extra builds of the pinned llama.cpp for tests: the top-level CMakeLists.txt, configured into its
own folder under build/ (ignored by git) with other options, e.g. build/unpatched
(SELFEXTEND_APPLY_PATCHES=OFF), build/fallbacks (SELFEXTEND_FORCE_FALLBACKS=ON) or build/rpc
(GGML_RPC=ON); and run_with_library(), which runs a function in a child process bound to one. Each build folder keeps its object files,
so a second run only asks ninja whether anything changed (about a second); ggml's GGML_CCACHE uses
ccache when it is installed."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"


def have_build_tools() -> bool:
    return shutil.which("cmake") is not None and shutil.which("ninja") is not None


def local_sdist():
    """A local copy of the llama-cpp-python sdist, if one is around: $SELFEXTEND_LLAMA_CPP_SDIST, or
    the one a package build downloaded into build/<wheel tag>/_deps. None: CMake downloads it (and
    checks its hash in every case)."""
    env = os.environ.get("SELFEXTEND_LLAMA_CPP_SDIST")
    if env:
        return Path(env)
    found = sorted(ROOT.glob(f"build/*/_deps/{SDIST_NAME}"))
    return found[0] if found else None


def _run(command, what):
    # paths relative to the checkout in ccache's keys: another build folder of the same source
    # (build/<wheel tag>, build/rpc, ...) hits the cache for every file compiled alike
    env = dict(os.environ, CCACHE_BASEDIR=os.environ.get("CCACHE_BASEDIR", str(ROOT)))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(map(str, command))}\n{tail}")


def build_llama_cpp(build_dir: Path, options, targets) -> Path:
    """Configure (first time only) and build `targets` in build_dir; return build_dir / "bin".

    cmake --build re-runs the configure step by itself when CMakeLists.txt or patches/*.patch
    change, so the build always matches the working tree."""
    build_dir = Path(build_dir)
    if not (build_dir / "build.ninja").exists():
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                     "-DCMAKE_BUILD_TYPE=Release", *options]
        sdist = local_sdist()
        if sdist:
            configure.append(f"-DSELFEXTEND_LLAMA_CPP_SDIST={sdist}")
        _run(configure, f"configuring {build_dir}")
    _run(["cmake", "--build", str(build_dir), "--target", *targets], f"building {' '.join(targets)} in {build_dir}")
    return build_dir / "bin"


# SELFEXTEND_FORCE_FALLBACKS value -> its build folder
FALLBACK_BUILDS = {"ON": ROOT / "build" / "fallbacks", "NO_FLASH_LSE": ROOT / "build" / "no-flash-lse"}


@functools.lru_cache(maxsize=None)  # once per test session
def fallbacks_lib_dir(which: str = "ON") -> Path:
    """A libllama whose Self-Extend takes the paths of devices without ggml_flash_attn_ext_lse:
    "ON", and without out_prod or flash attention of two head sizes either (V padded, V transposed for
    decode steps); "NO_FLASH_LSE", with those two (as the CPU has them)."""
    build = FALLBACK_BUILDS[which]
    library = build / "bin" / "libllama.so"
    # built every time: a no-op for ninja (about a second) unless the patches changed
    build_llama_cpp(build, [f"-DSELFEXTEND_FORCE_FALLBACKS={which}", "-DSELFEXTEND_BUILD_TOOLS=OFF"], ["llama"])
    assert library.exists(), f"the fallbacks build did not produce {library}"
    return library.parent


UNPATCHED_BUILD = ROOT / "build" / "unpatched"


def unpatched_lib_dir() -> Path:
    """Plain llama.cpp from the same pinned source, without patches/."""
    library = UNPATCHED_BUILD / "bin" / "libllama.so"
    if not library.exists():  # built once: the unpatched source does not change
        build_llama_cpp(UNPATCHED_BUILD, ["-DSELFEXTEND_APPLY_PATCHES=OFF"], ["llama"])
    assert library.exists(), f"the unpatched build did not produce {library}"
    return library.parent


# a process loads one libllama: the child imports the test module with SELFEXTEND_GGUF_LIB_PATH set
_CHILD = """
import importlib, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
function = getattr(importlib.import_module(sys.argv[3]), sys.argv[4])
print(json.dumps(function(*json.loads(sys.argv[5]))))
"""


def library_env(library_dir: Path) -> dict:
    """This process's environment for a child bound to library_dir (a process loads one libllama)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["SELFEXTEND_GGUF_LIB_PATH"] = str(library_dir)
    return env


def run_with_library(library_dir: Path, module: str, function: str, *args):
    """function(*args) of tests/<module>.py in a child process bound to library_dir; the function
    takes and returns JSON values."""
    env = library_env(library_dir)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(ROOT / "tests"), module, function,
                           json.dumps(args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed in the child (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
