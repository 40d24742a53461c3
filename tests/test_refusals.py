"""Architectures that Self-Extend cannot make exact are refused by name, with the reason, before
llama.cpp allocates anything: from Llama, and from the CLI (gguf_info.REFUSED_ARCHITECTURES; the
table is in docs/backends.md). Each case is a small valid GGUF of that architecture."""
import pytest

from selfextend_gguf import Llama
from selfextend_gguf._native import load_llama_cpp
from selfextend_gguf.gguf_info import REFUSED_ARCHITECTURES, read_model_info, self_extend_refusal
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
    assert run.returncode != 0
    assert arch in run.stderr and "Traceback" not in run.stderr, run.stderr
