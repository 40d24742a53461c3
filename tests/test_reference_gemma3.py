"""The reference decoder (selfextend_gguf/reference/model.py) on the tiny gemma3 fixture: what it
reads from the file, that it matches transformers' Gemma3ForCausalLM on the same weights, and the
claim the patched llama.cpp is built on: with W >= n_swa, Self-Extend on the global layers only
equals Self-Extend on every layer.
"""
import math
import types

import gguf
import pytest
import torch

from selfextend_gguf.gguf_info import read_model_info
from selfextend_gguf.reference import ARCHITECTURES, ReferenceModel
from selfextend_gguf.reference.attention import sliding_window_mask
from selfextend_gguf.reference.gguf_loader import sliding_layers
from selfextend_gguf.reference.model import gelu_ggml_cpu, gelu_tanh

N_SWA = 10  # the fixture's sliding window


def random_tokens(n, seed=0):
    return torch.randint(0, 317, (n,), generator=torch.Generator().manual_seed(seed))


def test_tiny_gemma3_file_is_what_llama_cpp_reads(tiny_gemma3_gguf, tiny_gemma3_reference):
    reader = gguf.GGUFReader(tiny_gemma3_gguf)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("gemma3.")}
    assert fields["gemma3.attention.sliding_window"] == N_SWA
    assert fields["gemma3.attention.sliding_window_pattern"] == 2
    assert (fields["gemma3.rope.freq_base"], fields["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
    assert fields["gemma3.attention.key_length"] == 32 != fields["gemma3.embedding_length"] // 4
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied, as every Gemma 3

    assert read_model_info(tiny_gemma3_gguf).sliding_window == N_SWA
    model = tiny_gemma3_reference
    hp = model.hparams
    assert hp.architecture == "gemma3" and hp.options is ARCHITECTURES["gemma3"] and model.tied_output
    assert (hp.options.qk_norm, hp.options.post_norms, hp.options.ffn_act, hp.options.embd_scale) == (
        True, True, "gelu", True)
    assert hp.swa_layers == (True, False, True, False)
    assert (hp.sliding_window, hp.head_dim, hp.rope_neox) == (N_SWA, 32, True)
    assert hp.attention_scale == 1 / math.sqrt(32)
    assert (model.rope.base, model.rope_swa.base, model.rope.neox, model.rope_swa.neox) == (1e6, 1e4, True, True)


def test_sliding_layer_pattern_as_llama_cpp_sets_it(tmp_path, make_tiny_gguf):
    """No pattern key (as the HF converter writes Gemma 3): llama.cpp's default, every 6th layer global."""
    path = make_tiny_gguf.write_tiny_gemma3(tmp_path / "six.gguf", n_layer=6, swa_pattern=None)
    assert ReferenceModel.from_gguf(path).hparams.swa_layers == (True,) * 5 + (False,)
    assert ARCHITECTURES["gemma3"].swa_pattern == 6
    assert sliding_layers(7, 512, None, 6) == (True,) * 5 + (False, True)
    assert sliding_layers(4, 512, 2, 6) == (True, False, True, False)
    assert sliding_layers(3, 512, 0, 6) == (True, True, True)
    assert sliding_layers(3, 512, [False, True, False], 6) == (False, True, False)
    assert sliding_layers(3, 0, 2, 6) == (False, False, False)  # no sliding window: every layer global


def test_sliding_window_mask_is_llama_cpp_standard_swa():
    pos = torch.arange(6)
    mask = sliding_window_mask(pos, pos, 3)  # visible iff q - k < n_swa (future keys: the causal mask)
    assert mask[5].tolist() == [False, False, False, True, True, True]


def test_ggml_cpu_gelu_is_a_float16_table():
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    exact, table = gelu_tanh(x), gelu_ggml_cpu(x)
    assert torch.equal(table[x <= -10], torch.zeros_like(table[x <= -10]))
    assert torch.equal(table[x >= 10], x[x >= 10])
    error = (table - exact).abs()  # float16 rounding of the input and of the output: ~5e-4 relative each
    assert (error <= 1e-3 * x.abs() + 1e-12).all() and error.max() > 1e-3
    halves = x.to(torch.float16).to(torch.float64)  # exactly representable inputs: only the output is rounded
    assert torch.equal(gelu_ggml_cpu(halves), gelu_tanh(halves.float()).half().double())


@pytest.mark.parametrize("window", [N_SWA, 12, 16])
def test_self_extend_on_global_layers_equals_every_layer_when_window_covers_sliding_window(
        tiny_gemma3_reference, window):
    """Why the patched llama.cpp may leave the sliding-window layers alone: when W >= n_swa every key
    such a layer sees is inside the neighbor window, where Self-Extend uses normal positions."""
    tokens = random_tokens(300, seed=window)
    with torch.no_grad():
        global_only = tiny_gemma3_reference.forward(tokens, "self_extend", 5, window)
        every_layer = tiny_gemma3_reference.forward(tokens, "self_extend", 5, window, self_extend_sliding=True)
        vanilla = tiny_gemma3_reference.forward(tokens)
    assert torch.equal(global_only, every_layer)
    assert (global_only - vanilla).abs().max() > 0.1  # and Self-Extend does act, on the global layers


@pytest.mark.parametrize("window", [4, N_SWA - 1])
def test_window_below_sliding_window_would_change_the_sliding_layers(tiny_gemma3_reference, window):
    """The converse, why W < n_swa is refused: then the sliding layers would see grouped keys."""
    tokens = random_tokens(200, seed=window)
    with torch.no_grad():
        global_only = tiny_gemma3_reference.forward(tokens, "self_extend", 4, window)
        every_layer = tiny_gemma3_reference.forward(tokens, "self_extend", 4, window, self_extend_sliding=True)
    assert (global_only - every_layer).abs().max() > 1e-2


@pytest.mark.parametrize("mode,group_size,window", [("vanilla", 1, None), ("self_extend", 3, 12)])
def test_decode_in_batches_matches_forward(tiny_gemma3_reference, mode, group_size, window):
    tokens = random_tokens(150, seed=3)
    with torch.no_grad():
        full = tiny_gemma3_reference.forward(tokens, mode, group_size, window)
        cache = tiny_gemma3_reference.new_cache(mode, group_size, window)
        stepped = tiny_gemma3_reference.decode_in_batches(tokens, cache, 7)
    assert (full - stepped).abs().max() <= 1e-10


def test_chunked_mode_is_refused(tiny_gemma3_reference):
    with pytest.raises(ValueError, match="chunked"):
        tiny_gemma3_reference.forward(random_tokens(20), "chunked", 2, 8)


def test_float32_copy(tiny_gemma3_reference):
    tokens = random_tokens(100)
    model32 = tiny_gemma3_reference.to(torch.float32)
    assert model32.hparams is tiny_gemma3_reference.hparams and model32.tied_output
    assert (model32.rope_swa, model32.ffn_gelu) == (tiny_gemma3_reference.rope_swa, tiny_gemma3_reference.ffn_gelu)
    with torch.no_grad():
        assert (model32.forward(tokens).double() - tiny_gemma3_reference.forward(tokens)).abs().max() <= 1e-3


# ----------------------------------------------------------------------------- transformers

def load_transformers_gemma3(path, hparams):
    """transformers' Gemma3ForCausalLM on the same GGUF, in float64 with its float32 casts lifted.

    transformers' GGUF reader does not read gemma3.attention.sliding_window_pattern (it assumes 6)
    nor the attention scale (query_pre_attn_scalar: it assumes 256, Gemma 3's head size), so both
    are set from the file. Its Gemma3RMSNorm and rotary embedding compute in float32 even in a
    float64 model: they are replaced by the same formulas in the model's dtype.
    """
    transformers = pytest.importorskip("transformers")
    from transformers import AutoConfig, Gemma3ForCausalLM, GgufConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.layer_types = ["sliding_attention" if s else "full_attention" for s in hparams.swa_layers]
    config.query_pre_attn_scalar = hparams.head_dim
    model = Gemma3ForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                              dtype=torch.float64, attn_implementation="sdpa",
                                              quantization_config=GgufConfig(dequantize=True)).eval()

    def rms_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    for module in model.modules():
        if isinstance(module, Gemma3RMSNorm):
            module.forward = types.MethodType(rms_norm, module)
    dim = hparams.head_dim
    inv_freq = {layer_type: 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
                for layer_type, params in config.rope_parameters.items()}

    def rotary(self, x, position_ids, layer_type):
        angles = position_ids[..., None].to(torch.float64) * inv_freq[layer_type]  # [1, n, dim/2]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    model.model.rotary_emb.forward = types.MethodType(rotary, model.model.rotary_emb)
    return model


def test_tiny_gemma3_matches_transformers(tiny_gemma3_gguf, tiny_gemma3_reference):
    """Vanilla logits, 200 tokens (past the trained context 64 and many sliding windows)."""
    hf = load_transformers_gemma3(tiny_gemma3_gguf, tiny_gemma3_reference.hparams)
    assert hf.config.rope_parameters["full_attention"]["rope_theta"] == tiny_gemma3_reference.rope.base
    assert hf.config.rope_parameters["sliding_attention"]["rope_theta"] == tiny_gemma3_reference.rope_swa.base
    assert hf.config.sliding_window == N_SWA
    tokens = random_tokens(200, seed=5)
    with torch.no_grad():
        diff64 = (hf(tokens[None]).logits[0] - tiny_gemma3_reference.forward(tokens)).abs().max().item()
    print(f"gemma3: max|logit diff| vs transformers, float64 {diff64:.3g}")
    assert diff64 <= 1e-9
