"""The reference's vanilla forward against an independent implementation of the same GGUF file:
Hugging Face transformers' LlamaForCausalLM loaded with gguf_file= (its own GGUF reader,
dequantizer, Q/K un-permutation and NeoX-layout RoPE), and Qwen2ForCausalLM for the tiny qwen2
fixture (Q/K/V biases, NeoX RoPE on weights stored unpermuted).

Float64: transformers' Llama computes RMSNorm, the RoPE angles and eager softmax in float32
even in a float64 model, which alone leaves ~1e-5 logit differences. `lift_float32_casts`
replaces those two pieces (RMSNorm, rotary embedding) with the same formulas evaluated in the
model's dtype; attention runs through SDPA, which computes in float64. Measured on this
project's machine: max |diff| ~7e-15 (tiny fixtures) and ~9e-14 (SmolLM2, 64 tokens).
Float32 (stock transformers, both in float32): ~5e-6 (tiny) and ~5e-5 (SmolLM2).
transformers loads all four tiny fixtures (F32, F16, Q8_0, tied F32), the tiny qwen2 and qwen3 F32
fixtures and SmolLM2 Q4_1.
"""
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GgufConfig, LlamaForCausalLM, Qwen2ForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, Qwen3RMSNorm  # noqa: E402

from selfextend_gguf.reference import ReferenceModel  # noqa: E402

FP64_TOL = 1e-9   # the issue asks for <= 1e-6
FP32_TOL = 1e-3

# SmolLM2's tokenization (transformers' GGUF tokenizer) of: "Self-Extend lets a language model
# read text far longer than the context it was trained on. Tokens near the query keep their normal
# positions, while distant tokens are grouped with the floor operation, so that every relative
# position stays inside the range seen during pretraining. No fine-tuning is needed, and the method"
SMOLLM2_FIRST_64_TOKENS = [
    21471, 29, 12267, 486, 13144, 253, 1789, 1743, 1012, 1694, 1869, 2848, 670, 260, 2468, 357,
    436, 7018, 335, 30, 1626, 11603, 2141, 260, 8520, 1446, 480, 2955, 6115, 28, 979, 9931,
    17837, 359, 20155, 351, 260, 6289, 4953, 28, 588, 338, 897, 5213, 2548, 13895, 2972, 260,
    1845, 2269, 981, 622, 15124, 30, 2838, 4979, 29, 40162, 314, 2350, 28, 284, 260, 1341,
]


def _rms_norm_in_model_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def lift_float32_casts(model):
    """Evaluate transformers' RMSNorm and RoPE angles in the model's dtype (see module doc)."""
    for module in model.modules():
        if isinstance(module, (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)):
            module.forward = types.MethodType(_rms_norm_in_model_dtype, module)
    config = model.config
    assert config.rope_parameters["rope_type"] == "default"
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # Qwen2Config has none
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"]
                      ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def rotary_forward(self, x, position_ids):
        angles = position_ids[..., None].to(torch.float64) * inv_freq    # [1, n, dim/2]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary = model.model.rotary_emb
    rotary.forward = types.MethodType(rotary_forward, rotary)
    return model


def load_transformers(path, model_class=LlamaForCausalLM):
    path = Path(path)
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    model = model_class.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float64,
                                        quantization_config=GgufConfig(dequantize=True),
                                        attn_implementation="sdpa")
    return lift_float32_casts(model.eval())


def compare(path, reference, tokens, model_class=LlamaForCausalLM):
    """(max |diff| in float64, max |diff| in float32) of vanilla logits."""
    hf = load_transformers(path, model_class)
    ids = torch.tensor(tokens)[None]
    with torch.no_grad():
        hf64 = hf(ids).logits[0]
        hf32 = hf.to(torch.float32)(ids).logits[0]
    ref64 = reference.forward(tokens)
    ref32 = reference.to(torch.float32).forward(tokens)
    assert hf64.dtype == ref64.dtype == torch.float64 and hf32.dtype == ref32.dtype == torch.float32
    return (hf64 - ref64).abs().max().item(), (hf32 - ref32).abs().max().item()


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "f32_tied"])
def test_tiny_fixture_matches_transformers(tiny_gguf_paths, kind):
    path = tiny_gguf_paths[kind]
    reference = ReferenceModel.from_gguf(path, dtype=torch.float64)
    tokens = torch.randint(0, 317, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    diff64, diff32 = compare(path, reference, tokens)  # 200 tokens: past the trained context 64
    print(f"{kind}: max|logit diff| float64 {diff64:.3g}, float32 {diff32:.3g}")
    assert diff64 <= FP64_TOL
    assert diff32 <= FP32_TOL


def test_tiny_qwen2_matches_transformers(tiny_qwen2_gguf, tiny_qwen2_reference):
    tokens = torch.randint(0, 317, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    diff64, diff32 = compare(tiny_qwen2_gguf, tiny_qwen2_reference, tokens, Qwen2ForCausalLM)
    print(f"qwen2: max|logit diff| float64 {diff64:.3g}, float32 {diff32:.3g}")
    assert diff64 <= FP64_TOL
    assert diff32 <= FP32_TOL


def test_tiny_qwen3_matches_transformers(tiny_qwen3_gguf, tiny_qwen3_reference):
    """Qwen3ForCausalLM: q/k RMSNorm per head before RoPE, heads of 32 (not n_embd / n_head = 16).
    transformers' GGUF loader does not read qwen3's key_length (its Qwen3Config defaults to heads of
    128), so head_dim is passed to it."""
    head_dim = tiny_qwen3_reference.hparams.head_dim

    def from_pretrained(*args, **kwargs):
        model = Qwen3ForCausalLM.from_pretrained(*args, head_dim=head_dim, **kwargs)
        assert model.config.head_dim == 32
        return model

    tokens = torch.randint(0, 317, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    diff64, diff32 = compare(tiny_qwen3_gguf, tiny_qwen3_reference, tokens,
                             types.SimpleNamespace(from_pretrained=from_pretrained))
    print(f"qwen3: max|logit diff| float64 {diff64:.3g}, float32 {diff32:.3g}")
    assert diff64 <= FP64_TOL
    assert diff32 <= FP32_TOL


def test_smollm2_first_64_tokens_match_transformers(smollm2_path, smollm2_reference):
    diff64, diff32 = compare(smollm2_path, smollm2_reference, SMOLLM2_FIRST_64_TOKENS)
    print(f"SmolLM2: max|logit diff| float64 {diff64:.3g}, float32 {diff32:.3g}")
    assert diff64 <= FP64_TOL
    assert diff32 <= FP32_TOL
