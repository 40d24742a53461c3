"""Extra builds of the pinned llama.cpp for tests: the top-level CMakeLists.txt, configured into its
own folder under build/ (ignored by git) with other options, e.g. build/unpatched
(SELFEXTEND_APPLY_PATCHES=OFF) or build/rpc (GGML_RPC=ON); run_with_library(), which runs a function
in a child process bound to one, optionally with every layer on a "limited device" (limited_device.cpp:
the CPU's kernels behind a device without some of Self-Extend's operations, so that Self-Extend takes
the paths of GPUs without them). Each build folder keeps its object files,
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


# limited_device.cpp's flags, by the paths that Self-Extend takes on the device
LIMITED_DEVICES = {
    # no ggml_flash_attn_ext_lse: prefill through one flash attention over the doubled head size, V at its own
    # head size; single-token steps read V with out_prod, scores in place (as on the CPU)
    "no_flash_lse": 1,
    # none of Self-Extend's faster operations, and flash attention of one head size only: V padded to the
    # doubled head size, V transposed for single-token steps, score blocks joined by CONCAT
    "fallbacks": 1 | 2 | 4 | 8,
}
LIMITED_DEVICE_SOURCE = ROOT / "tests" / "limited_device.cpp"


def patched_source_tree() -> Path:
    """The patched llama.cpp tree of the package build, build/<wheel tag> (its ggml headers, internal ones
    included, and its tests/); not one of the other builds' trees, which may be unpatched or older."""
    found = sorted(ROOT.glob("build/py3-*/llama.cpp-src/ggml/src/ggml-backend-impl.h"))
    if not found:
        raise RuntimeError("no patched llama.cpp tree under build/: install the package first (pip install .)")
    return found[0].parents[2]


def compiled_against(library_dir: Path, source: Path, folder: str, name: str, flags, what: str) -> Path:
    """source compiled with flags against the patched ggml headers and linked to the ggml of library_dir, into
    build/<folder>/<library_dir's hash>/<name> (rebuilt when the source is newer)."""
    import hashlib
    out = ROOT / "build" / folder / hashlib.sha1(str(library_dir).encode()).hexdigest()[:12] / name
    if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        tree = patched_source_tree()
        _run(["c++", "-std=c++17", "-O1", *flags, f"-I{tree / 'ggml' / 'include'}", f"-I{tree / 'ggml' / 'src'}",
              str(source), "-o", str(out), f"-L{library_dir}", f"-Wl,-rpath,{library_dir}",
              "-lggml", "-lggml-base", "-lggml-cpu", "-pthread"], what)
    return out


def limited_device_lib(library_dir: Path) -> Path:
    """limited_device.cpp compiled against the patched ggml and linked to the libraries of library_dir."""
    return compiled_against(library_dir, LIMITED_DEVICE_SOURCE, "limited-device", "liblimited_device.so",
                            ["-shared", "-fPIC"], "building the limited device")


def op_harness_program(library_dir: Path) -> Path:
    """llama.cpp's own op harness, tests/test-backend-ops.cpp of the patched tree (with the cases that patches
    0004 and 0008 add), compiled against the ggml of library_dir."""
    return compiled_against(library_dir, patched_source_tree() / "tests" / "test-backend-ops.cpp",
                            "test-backend-ops", "test-backend-ops", [], "building test-backend-ops")


UNPATCHED_BUILD = ROOT / "build" / "unpatched"


def unpatched_lib_dir() -> Path:
    """Plain llama.cpp from the same pinned source, without patches/."""
    library = UNPATCHED_BUILD / "bin" / "libllama.so"
    if not library.exists():  # built once: the unpatched source does not change
        build_llama_cpp(UNPATCHED_BUILD, ["-DSELFEXTEND_APPLY_PATCHES=OFF"], ["llama"])
    assert library.exists(), f"the unpatched build did not produce {library}"
    return library.parent


# a process loads one libllama: the child imports the test module with SELFEXTEND_GGUF_LIB_PATH set, and with
# SELFEXTEND_TEST_LIMITED_DEVICE=<library>:<flags> registers the limited device first
_CHILD = """
import importlib, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import native_build
native_build.register_limited_device()
function = getattr(importlib.import_module(sys.argv[3]), sys.argv[4])
print(json.dumps(function(*json.loads(sys.argv[5]))))
"""


def limited_device_env(library_dir: Path, limited_device: str) -> dict:
    """What a child bound to library_dir needs to run every layer on the limited device (a LIMITED_DEVICES key)."""
    return {"SELFEXTEND_TEST_LIMITED_DEVICE": f"{limited_device_lib(library_dir)}:{LIMITED_DEVICES[limited_device]}",
            "SELFEXTEND_TEST_N_GPU_LAYERS": "-1"}


def register_limited_device() -> None:
    """In a child: register the limited device that SELFEXTEND_TEST_LIMITED_DEVICE names, if any, before a model
    is loaded."""
    if os.environ.get("SELFEXTEND_TEST_LIMITED_DEVICE"):
        import ctypes
        from selfextend_gguf._native import load_llama_cpp
        load_llama_cpp()  # ggml's libraries first: the device links to them
        library, flags = os.environ["SELFEXTEND_TEST_LIMITED_DEVICE"].rsplit(":", 1)
        ctypes.CDLL(library).limited_device_register(ctypes.c_uint(int(flags)))


def library_env(library_dir: Path) -> dict:
    """This process's environment for a child bound to library_dir (a process loads one libllama)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["SELFEXTEND_GGUF_LIB_PATH"] = str(library_dir)
    return env


def main_lib_dir() -> Path:
    """The library this test session runs (SELFEXTEND_GGUF_LIB_PATH, or the installed package's)."""
    from selfextend_gguf._native import lib_dir
    return Path(lib_dir())


def run_with_library(library_dir: Path, module: str, function: str, *args, limited_device: str | None = None):
    """function(*args) of tests/<module>.py in a child process bound to library_dir; the function
    takes and returns JSON values. limited_device (a LIMITED_DEVICES key): every layer on that device."""
    env = library_env(library_dir)
    if limited_device:
        env.update(limited_device_env(library_dir, limited_device))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(ROOT / "tests"), module, function,
                           json.dumps(args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed in the child (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
