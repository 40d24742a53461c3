"""llama.cpp's own programs built from the patched source (llama-completion, llama-cli), their
start-up checks, and other llama-cpp-python tools in the same environment (`import llama_cpp`, `llm`).

Exactness: on the tiny fixture (trained context 64) with G=4, W=16 (reach (64 - 16 + 4) * 4 = 208
tokens), a prompt of about 3x the trained context, each program's greedy tokens must be the ones
selfextend_gguf.Llama gives, and differ from what it gives with Self-Extend off.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfextend_gguf._native import lib_dir, program_path
from selfextend_gguf.settings import SelfExtend, max_context
from selfextend_gguf.testing.parity import greedy_tokens

GROUP, WINDOW, N_CTX, N_PREDICT = 4, 16, 208, 16
TIMEOUT = 120
PROMPT = ("The lighthouse keeper counted the ships that passed in the night, and wrote each name in a "
          "blue notebook: the Marigold, the Heron, the Silver Bell, the Fairwind, the Old Anchor, the "
          "Juniper, the Kestrel and the Morning Star sailed north before the storm")


def greedy_python(model, prompt_tokens, group_size, n=N_PREDICT) -> bytes:
    """The text of n greedy tokens from selfextend_gguf.Llama after prompt_tokens."""
    from selfextend_gguf import Llama

    llm = Llama(str(model), n_ctx=N_CTX, grp_attn_n=group_size, grp_attn_w=WINDOW, verbose=False)
    try:
        return llm.detokenize(greedy_tokens(llm, prompt_tokens, n))
    finally:
        llm.close()


def tokenize(model, text: str, special=False) -> list[int]:
    from selfextend_gguf import Llama

    llm = Llama(str(model), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=special)
    finally:
        llm.close()


def run_program(name, *args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(program_path(name)), *map(str, args)], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def completion(model, *args) -> subprocess.CompletedProcess:
    return run_program("llama-completion", "-m", model, "-c", N_CTX, "-p", PROMPT, "-n", N_PREDICT,
                       "--temp", 0, "--no-display-prompt", "-no-cnv", "--no-warmup", "-t", 2, *args)


@pytest.fixture(scope="module")
def prompt_tokens(tiny_f32_gguf):
    tokens = tokenize(tiny_f32_gguf, PROMPT)
    assert 2.5 * 64 <= len(tokens) and len(tokens) + N_PREDICT <= N_CTX  # about 3x the trained context, within the reach
    return tokens


def test_llama_completion_is_exact_self_extend(tiny_f32_gguf, prompt_tokens):
    done = completion(tiny_f32_gguf, "--grp-attn-n", GROUP, "--grp-attn-w", WINDOW)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    expected = greedy_python(tiny_f32_gguf, prompt_tokens, GROUP)
    assert done.stdout.startswith(expected) and len(expected) > 0
    assert greedy_python(tiny_f32_gguf, prompt_tokens, 1) != expected  # Self-Extend changes the answer
    log = done.stderr.decode()
    assert f"grp_attn_n = {GROUP}, grp_attn_w = {WINDOW}, reach = 208 tokens" in log
    assert "possible training context overflow" not in log


def test_llama_completion_without_self_extend_warns_and_differs(tiny_f32_gguf, prompt_tokens):
    done = completion(tiny_f32_gguf)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "possible training context overflow" in done.stderr.decode()
    assert done.stdout.startswith(greedy_python(tiny_f32_gguf, prompt_tokens, 1))


def test_self_extend_flags_from_the_environment(tiny_f32_gguf, prompt_tokens):
    env = dict(os.environ, LLAMA_ARG_GRP_ATTN_N=str(GROUP), LLAMA_ARG_GRP_ATTN_W=str(WINDOW))
    done = subprocess.run([str(program_path("llama-completion")), "-m", str(tiny_f32_gguf), "-c", str(N_CTX),
                           "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0", "--no-display-prompt", "-no-cnv",
                           "--no-warmup", "-t", "2"], capture_output=True, timeout=TIMEOUT, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.startswith(greedy_python(tiny_f32_gguf, prompt_tokens, GROUP))


def test_llama_cli_is_exact_self_extend(tiny_f32_gguf):
    content = PROMPT[:150]
    chat = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"  # the fixture's ChatML template
    tokens = tokenize(tiny_f32_gguf, chat, special=True)
    done = run_program("llama-cli", "-m", tiny_f32_gguf, "-c", N_CTX, "--grp-attn-n", GROUP, "--grp-attn-w",
                       WINDOW, "-p", content, "-n", N_PREDICT, "--temp", 0, "-st", "--no-warmup", "-t", 2,
                       "--simple-io", "--no-show-timings")
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-3000:]
    expected = greedy_python(tiny_f32_gguf, tokens, GROUP)
    assert len(tokens) > 64 and expected
    assert expected.decode(errors="replace").strip() in done.stdout.decode(errors="replace")


@pytest.mark.parametrize("args,message", [
    (["--grp-attn-n", "0"], "--grp-attn-n must be at least 1"),
    (["--grp-attn-n", "4", "--grp-attn-w", "0"], "--grp-attn-w must be at least 1"),
    (["--grp-attn-n", "4", "--grp-attn-w", "64"], "must be smaller than the model's trained context (64 tokens)"),
    (["--grp-attn-n", "2", "--grp-attn-w", "16", "-c", "1000"], "beyond what --grp-attn-n 2 --grp-attn-w 16 reach (112 tokens"),
])
@pytest.mark.parametrize("program", ["llama-completion", "llama-cli", "llama-server"])
def test_bad_self_extend_flags_stop_at_start_up(tiny_f32_gguf, program, args, message):
    common = ["-m", tiny_f32_gguf, "--no-warmup"] + ([] if "-c" in args else ["-c", N_CTX])
    extra = {"llama-completion": ["-p", "hi", "-n", "1", "-no-cnv"], "llama-cli": ["-p", "hi", "-n", "1", "-st"],
             "llama-server": ["--port", "0"]}[program]
    done = run_program(program, *common, *args, *extra, timeout=60)
    text = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode > 0, text[-2000:]  # an exit status, not a signal (no abort, no core dump)
    assert message in text, text[-2000:]
    assert "core dumped" not in text and "GGML_ASSERT" not in text


@pytest.mark.parametrize("program,n_seq", [("llama-completion", 1), ("llama-server", 4)])
def test_a_context_beyond_the_reach_suggests_the_smallest_group_size_that_reaches_it(tiny_f32_gguf, program, n_seq):
    """llama-server's 4 default slots share -c; the suggestion matches the Python resolver's reach."""
    n_ctx_seq = 1000 // n_seq
    smallest = next(g for g in range(2, 1024) if max_context(64, SelfExtend(g, 16)) >= n_ctx_seq)
    extra = ["-p", "hi", "-n", "1", "-no-cnv"] if program == "llama-completion" else ["--port", "0"]
    done = run_program(program, "-m", tiny_f32_gguf, "--no-warmup", "--grp-attn-n", "2", "--grp-attn-w", "16",
                       "-c", "1000", *extra, timeout=60)
    text = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode > 0
    assert f"the context of {n_ctx_seq} tokens per sequence" in text, text[-2000:]
    assert f"use --grp-attn-n {smallest} or more" in text, text[-2000:]
    assert max_context(64, SelfExtend(smallest - 1, 16)) < n_ctx_seq


def test_import_llama_cpp_loads_the_patched_library():
    """A plain `import llama_cpp`, as any llama-cpp-python tool does, with no selfextend_gguf."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "SELFEXTEND_GGUF_LIB_PATH")}
    script = "import llama_cpp; lib = llama_cpp.llama_cpp._lib; print(lib._name); print(hasattr(lib, 'llama_set_self_extend'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path("/"), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    name, has_symbol = done.stdout.split()
    assert has_symbol == "True"
    if "SELFEXTEND_GGUF_LIB_PATH" not in os.environ:
        assert Path(name).resolve() == (lib_dir() / "libllama.so").resolve()


TURN_ON_SCRIPT = """
import ctypes, sys
import llama_cpp
lib = llama_cpp.llama_cpp._lib
lib.llama_set_self_extend.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
for name in ("llama_get_self_extend_group_size", "llama_get_self_extend_neighbor_window", "llama_get_self_extend_n_ctx_max"):
    getattr(lib, name).argtypes = [ctypes.c_void_p]
llm = llama_cpp.Llama(sys.argv[1], n_ctx=208, verbose=False)
assert lib.llama_set_self_extend(llm._ctx.ctx, 4, 16) == 0
print(lib.llama_get_self_extend_group_size(llm._ctx.ctx), lib.llama_get_self_extend_neighbor_window(llm._ctx.ctx),
      lib.llama_get_self_extend_n_ctx_max(llm._ctx.ctx))
tokens = llm.tokenize(sys.argv[2].encode(), add_bos=False)
print(" ".join(str(t) for _, t in zip(range(8), llm.generate(tokens, top_k=1, temp=0.0))))
"""


def test_plain_llama_cpp_turns_self_extend_on_through_the_exported_function(tiny_f32_gguf, prompt_tokens):
    """What any llama-cpp-python tool can do: llama_cpp.Llama, then llama_set_self_extend on its context."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    done = subprocess.run([sys.executable, "-c", TURN_ON_SCRIPT, str(tiny_f32_gguf), PROMPT], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    settings_line, tokens_line = done.stdout.strip().splitlines()
    assert settings_line == f"{GROUP} {WINDOW} 208"
    from selfextend_gguf import Llama

    llm = Llama(str(tiny_f32_gguf), n_ctx=N_CTX, grp_attn_n=GROUP, grp_attn_w=WINDOW, verbose=False)
    try:
        expected = [t for _, t in zip(range(8), llm.generate(prompt_tokens, top_k=1, temp=0.0))]
    finally:
        llm.close()
    assert tokens_line == " ".join(map(str, expected))


def test_llm_command_of_the_same_environment_runs():
    llm = Path(sys.executable).parent / "llm"
    if not llm.exists():
        llm = Path(shutil.which("llm") or "llm")
    done = subprocess.run([str(llm), "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "llm" in done.stdout.lower() and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["llama-server", "llama-cli", "llama-completion"])
def test_programs_are_on_the_environment_path(name):
    command = Path(sys.executable).parent / name  # the console script that runs selfextend_gguf/bin/<name>
    done = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "version" in (done.stdout + done.stderr)
