"""Architectures that Self-Extend cannot make exact are refused by name, with the reason, before
llama.cpp allocates anything: from Llama, and from the CLI (gguf_info.REFUSED_ARCHITECTURES; the
table is in docs/backends.md). Each case is a small valid GGUF of that architecture. The fix is
worded as the caller spells it: grp_attn_n=1 for the API, --grp-attn-n 1 for the CLI and serve."""
import argparse

import pytest

from selfextend_gguf import Llama
from selfextend_gguf._native import load_llama_cpp
from selfextend_gguf.gguf_info import REFUSED_ARCHITECTURES, read_model_info, self_extend_refusal
from selfextend_gguf.serve import add_serve_arguments, server_command
from selfextend_gguf.testing.cli import run_cli

llama_cpp = load_llama_cpp()

CASES = [pytest.param(arch, reason, id=arch) for reason, names in REFUSED_ARCHITECTURES.items()
         for arch in sorted(names)]
# one architecture of each reason, for the slower CLI checks
ONE_PER_REASON = [pytest.param(sorted(names)[0], reason, id=sorted(names)[0])
                  for reason, names in REFUSED_ARCHITECTURES.items()]


@pytest.fixture
def no_allocation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("llama_cpp.Llama.__init__ ran: the architecture was not checked first")
    monkeypatch.setattr(llama_cpp.Llama, "__init__", refuse)


@pytest.mark.parametrize("arch,reason", CASES)
def test_llama_refuses_before_loading(tmp_path, make_tiny_gguf, no_allocation, arch, reason):
    path = make_tiny_gguf.write_unsupported_arch_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    assert read_model_info(path).self_extend_refusal == reason
    with pytest.raises(ValueError) as refused:
        Llama(str(path), n_ctx=256, grp_attn_n=4, grp_attn_w=16)
    assert arch in str(refused.value) and reason in str(refused.value)
    assert str(refused.value).endswith("Run it without Self-Extend (grp_attn_n=1)")  # the API's spelling


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi2", "phi3", "mistral3"])
def test_rope_decoders_are_not_refused(arch):
    assert self_extend_refusal(arch) is None


@pytest.mark.parametrize("arch,reason", ONE_PER_REASON)
def test_cli_names_the_reason(tmp_path, make_tiny_gguf, arch, reason):
    path = make_tiny_gguf.write_unsupported_arch_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    info = run_cli("info", "--model", path)
    assert info.returncode == 0, info.stderr
    assert f"Self-Extend: not possible ({arch} {reason[:40]}" in " ".join(info.stdout.split())
    run = run_cli("run", "--model", path, "--grp-attn-n", "4", "-p", "hello")
    assert run.returncode == 2
    assert arch in run.stderr and "Traceback" not in run.stderr, run.stderr
    message = " ".join(run.stderr.split())
    assert "Run it without Self-Extend (--grp-attn-n 1)" in message and "grp_attn_n" not in message  # the CLI's
    serve = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--model", str(path), "--grp-attn-n", "4"])
    with pytest.raises(ValueError, match=r"Run it without Self-Extend \(--grp-attn-n 1\)$"):
        server_command(serve)
