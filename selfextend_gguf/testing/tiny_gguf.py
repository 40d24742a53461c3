"""Write small random-weight llama-, qwen2-, qwen3-, gemma2-, gemma3-, phi2- or phi3-architecture GGUF files for tests.

The files load in llama.cpp and transformers: GQA, a byte-level BPE (GPT-2 style) vocabulary of
a few hundred tokens that tokenizes any text, ChatML special tokens and chat template.
llama: normal RoPE (llama.cpp's LLAMA_ROPE_TYPE_NORM). qwen2: the same plus biases on the Q, K
and V projections, NeoX RoPE (LLAMA_ROPE_TYPE_NEOX, implied by the architecture) and RoPE base
1e6. Same seed -> same weights for every weight type, so an F32, F16 and Q8_0 file differ only
by storage precision; a qwen2 file has the llama file's weights plus its biases.
qwen3 (write_tiny_qwen3): no biases, per-head RMSNorms of Q and K before RoPE (attn_q_norm,
attn_k_norm), NeoX RoPE, RoPE base 1e6, and a head size (attention.key_length) that is not
n_embd / n_head, as in Qwen3-0.6B (1024 = 16 heads x 64, heads of 128).

gemma3 (write_tiny_gemma3): sliding-window and global layers, q/k norms, GELU-gated FFN, tied
output (its own weights; see its docstring). gemma2 (write_tiny_gemma2): the same without q/k norms,
with attention and final logit soft-capping. phi2 (write_tiny_phi2): LayerNorms, parallel attention
and FFN, fused QKV, biases, partial rotary. phi3 (write_tiny_phi3): fused QKV and gate/up, partial
rotary, LongRoPE (short and long RoPE factors, an original context, an attention factor).

    python scripts/make_tiny_gguf.py OUT.gguf [--arch llama|qwen2|qwen3|gemma2|gemma3|phi2|phi3] --type f32|f16|q8_0 [--n-ctx-train 64] [--seed 0]
    python scripts/make_tiny_gguf.py OUT.gguf --shape smollm2|llama-1b --type q8_0   (speed runs)

Importable: write_tiny_llama(path, ...), write_tiny_qwen2(path, ...), write_tiny_qwen3(path, ...),
write_tiny_gemma2(path, ...), write_tiny_gemma3(path, ...), write_tiny_phi2(path, ...),
write_tiny_phi3(path, ...), write_unsupported_arch_gguf(path).
"""
import argparse
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import gguf

WEIGHT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# what sets the architectures of write_tiny_model apart; llama.cpp reads them with the same
# hyperparameter keys. rope_dims_key: llama.cpp's llama converter writes rope.dimension_count, its
# qwen2 and qwen3 converters do not (llama.cpp then takes the head size). qk_norm: per-head
# attn_q_norm / attn_k_norm weights. head_dim: the default head size (None: n_embd / n_head)
ARCHITECTURES = {
    "llama": dict(qkv_bias=False, qk_norm=False, rope_freq_base=10000.0, rope_dims_key=True, head_dim=None),
    "qwen2": dict(qkv_bias=True, qk_norm=False, rope_freq_base=1e6, rope_dims_key=False, head_dim=None),
    "qwen3": dict(qkv_bias=False, qk_norm=True, rope_freq_base=1e6, rope_dims_key=False, head_dim=32),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # bos, chat start, eos
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_CORPUS = """\
The quick brown fox jumps over the lazy dog. The passkey is 12345; remember it, the passkey
is hidden in a long text. There is a system, a user and an assistant: the user asks and the
assistant answers. Self-Extend maps the positions of distant tokens into groups, so that the
model sees only positions it was trained on, while the tokens in the neighbor window keep
their normal positions. This is the end of the story, and then there is another one.
"""


# ----------------------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def pretokenize(text):
    """A simplified GPT-2 split: words, numbers and punctuation runs with a leading space."""
    return re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", text)


def train_bpe(text, n_merges):
    """Greedy byte-level BPE: the n_merges most frequent pairs (ties: smallest pair first)."""
    byte_char = bytes_to_unicode()
    words = Counter(tuple(byte_char[b] for b in w.encode("utf-8")) for w in pretokenize(text))
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def tiny_vocab(n_vocab=320):
    """(tokens, token_types, merges): 256 byte tokens, BPE merges, then the special tokens."""
    byte_char = bytes_to_unicode()
    tokens = [byte_char[b] for b in range(256)]
    merges = train_bpe(BPE_CORPUS, n_vocab - 256 - len(SPECIAL_TOKENS))
    tokens += [a + b for a, b in merges]
    tokens += SPECIAL_TOKENS
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    types += [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens, types, [f"{a} {b}" for a, b in merges]


# ----------------------------------------------------------------------------- weights

def random_llama_weights(rng, n_vocab, n_embd, n_head, n_head_kv, n_layer, n_ff, tied_output,
                         qkv_bias=False, qk_norm=False, head_dim=None):
    """{gguf tensor name: float32 array in torch order [out, in]}.

    Scales keep activations O(1): q, k, v entries ~1 from a unit-RMS input, attention scores of
    std ~1 (not uniform, so positions matter), residual updates ~0.5, logits of std ~2.
    qkv_bias adds the biases, qk_norm the per-head q/k norm weights [head_dim] (both drawn last:
    the other weights do not change). head_dim None: n_embd // n_head.
    """
    head_dim = n_embd // n_head if head_dim is None else head_dim

    def normal(std, *shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n=n_embd):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    proj = 1.0 / np.sqrt(n_embd)
    w = {"token_embd.weight": normal(0.5, n_vocab, n_embd)}
    for i in range(n_layer):
        w[f"blk.{i}.attn_norm.weight"] = norm_weight()
        w[f"blk.{i}.attn_q.weight"] = normal(proj, n_head * head_dim, n_embd)
        w[f"blk.{i}.attn_k.weight"] = normal(proj, n_head_kv * head_dim, n_embd)
        w[f"blk.{i}.attn_v.weight"] = normal(proj, n_head_kv * head_dim, n_embd)
        w[f"blk.{i}.attn_output.weight"] = normal(0.06, n_embd, n_head * head_dim)
        w[f"blk.{i}.ffn_norm.weight"] = norm_weight()
        w[f"blk.{i}.ffn_gate.weight"] = normal(proj, n_ff, n_embd)
        w[f"blk.{i}.ffn_up.weight"] = normal(proj, n_ff, n_embd)
        w[f"blk.{i}.ffn_down.weight"] = normal(0.06, n_embd, n_ff)
    w["output_norm.weight"] = norm_weight()
    output = normal(0.25, n_vocab, n_embd)  # drawn even when tied, so other weights don't change
    if not tied_output:
        w["output.weight"] = output
    if qkv_bias:
        w.update(random_qkv_biases(rng, n_layer, n_head * head_dim, n_head_kv * head_dim))
    if qk_norm:
        for i in range(n_layer):
            w[f"blk.{i}.attn_q_norm.weight"] = norm_weight(head_dim)
            w[f"blk.{i}.attn_k_norm.weight"] = norm_weight(head_dim)
    return w


def random_qkv_biases(rng, n_layer, q_dim, kv_dim):
    """{blk.i.attn_{q,k,v}.bias: [dim]}, std 0.5: about half the size of the projections, so
    the biased (position-independent before RoPE) part of Q and K is felt in the scores."""
    w = {}
    for i in range(n_layer):
        for name, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            w[f"blk.{i}.attn_{name}.bias"] = (rng.standard_normal(dim) * 0.5).astype(np.float32)
    return w


def add_weight(writer, name, array, qtype):
    """Matrices in qtype; 1-D tensors (norms) stay F32, as llama.cpp's converter keeps them."""
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def write_tiny_model(path, arch="llama", *, weight_type="f32", n_ctx_train=64, n_embd=64, n_head=4,
                     n_head_kv=2, n_layer=2, n_ff=128, n_vocab=320, head_dim=None, rope_freq_base=None,
                     rope_scaling=None, rope_scaling_factor=1.0, rope_freq_factors=False,
                     rms_eps=1e-5, tied_output=False, sliding_window=None, seed=0):
    """Write a random-weight GGUF of architecture arch (see ARCHITECTURES) to path and return
    path (as a Path). head_dim, rope_freq_base None: the architecture's default (head_dim: n_embd
    / n_head unless the architecture has its own); a head_dim other than n_embd / n_head is
    written as attention.key_length / value_length. rope_scaling: "linear" or "yarn" metadata
    with rope_scaling_factor; rope_freq_factors: a random per-frequency divisor tensor
    rope_freqs.weight in [1, 4], as Llama 3.1 models carry. sliding_window: an
    attention.sliding_window key, as a Mistral-style GGUF may carry (llama.cpp's llama ignores it)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    spec = ARCHITECTURES[arch]
    head_dim = spec["head_dim"] if head_dim is None else head_dim
    if (head_dim is None and n_embd % n_head) or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head (or head_dim given), and n_head of n_head_kv")
    head_dim = n_embd // n_head if head_dim is None else head_dim
    qtype, file_type = WEIGHT_TYPES[weight_type]
    tokens, token_types, merges = tiny_vocab(n_vocab)
    weights = random_llama_weights(np.random.default_rng(seed), len(tokens), n_embd, n_head,
                                   n_head_kv, n_layer, n_ff, tied_output, qkv_bias=spec["qkv_bias"],
                                   qk_norm=spec["qk_norm"], head_dim=head_dim)
    path = Path(path)
    writer = new_writer(path, arch, weight_type, seed, file_type, len(tokens), n_ctx_train, n_embd, n_layer,
                        n_ff, n_head, n_head_kv)
    if head_dim * n_head != n_embd:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec["rope_dims_key"]:
        writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(spec["rope_freq_base"] if rope_freq_base is None else rope_freq_base)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(rope_scaling_factor)
    if rope_freq_factors:
        factors = np.random.default_rng(seed + 1).uniform(1.0, 4.0, size=head_dim // 2).astype(np.float32)
        writer.add_tensor("rope_freqs.weight", factors)
    writer.add_layer_norm_rms_eps(rms_eps)
    add_tokenizer(writer, tokens, token_types, merges)
    return write_weights_and_close(writer, weights, qtype, path)


def new_writer(path, arch, weight_type, seed, file_type, n_vocab, n_ctx_train, n_embd, n_layer, n_ff, n_head,
               n_head_kv, name=None):
    """A GGUFWriter with the metadata every architecture here shares; general.name: name, or tiny-ARCH-..."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or f"tiny-{arch}-{weight_type}-seed{seed}")
    writer.add_file_type(file_type)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    return writer


def write_weights_and_close(writer, weights, qtype, path):
    """Add the weights, write the file, return its path."""
    for name, array in weights.items():
        add_weight(writer, name, array, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_arch_gguf(path, arch, weight_type, seed, n_vocab, n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv,
                    random_weights, add_keys, name=None):
    """The common steps of the writers of one architecture: random_weights(rng, n_vocab) -> the
    weights, add_keys(writer) -> the architecture's own metadata; the tiny tokenizer; returns path.
    name: general.name (None: new_writer's)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    qtype, file_type = WEIGHT_TYPES[weight_type]
    tokens, token_types, merges = tiny_vocab(n_vocab)
    weights = random_weights(np.random.default_rng(seed), len(tokens))
    path = Path(path)
    writer = new_writer(path, arch, weight_type, seed, file_type, len(tokens), n_ctx_train, n_embd, n_layer,
                        n_ff, n_head, n_head_kv, name)
    add_keys(writer)
    add_tokenizer(writer, tokens, token_types, merges)
    return write_weights_and_close(writer, weights, qtype, path)


def add_tokenizer(writer, tokens, token_types, merges):
    """The tiny byte-level BPE vocabulary (tiny_vocab()), no BOS/EOS added, ChatML template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_tiny_llama(path, **kwargs):
    """A random-weight llama GGUF (keyword arguments: write_tiny_model's); returns its Path."""
    return write_tiny_model(path, "llama", **kwargs)


def write_tiny_qwen2(path, **kwargs):
    """A random-weight qwen2 GGUF: Q/K/V biases, NeoX RoPE, RoPE base 1e6 (keyword arguments:
    write_tiny_model's); returns its Path."""
    return write_tiny_model(path, "qwen2", **kwargs)


def write_tiny_qwen3(path, **kwargs):
    """A random-weight qwen3 GGUF (llama.cpp's src/models/qwen3.cpp): per-head q/k RMSNorms before
    RoPE, NeoX RoPE, RoPE base 1e6, no biases, SwiGLU, heads of 32 with n_embd 64 and 4 heads
    (attention.key_length; keyword arguments: write_tiny_model's); returns its Path."""
    return write_tiny_model(path, "qwen3", **kwargs)


# ----------------------------------------------------------------------------- gemma3

# The tiny gemma3's post_ffw_norm weights are FFN_OUT_SCALE * (1 + 0.1 N(0, 1)): its FFN's residual
# updates are a quarter of its attention's. llama.cpp's CPU GELU rounds its input to float16 (see reference/model.py
# gelu_ggml_cpu), so a 1e-7 change of an input can move an output by 5e-4; at full size these flips
# alone move the tiny model's logits by up to ~7e-4 (measured), at a quarter ~1e-4, well under the
# parity bar of 1e-3.
FFN_OUT_SCALE = 0.25


def samplers(rng):
    """(normal(std, *shape), norm_weight(n)): float32 draws from rng, N(0, std^2) and 1 + 0.1 N(0, 1)."""
    def normal(std, *shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    return normal, norm_weight


def random_gemma3_weights(rng, n_vocab, n_embd, n_head, n_head_kv, head_dim, n_layer, n_ff, qk_norm=True):
    """{gguf tensor name: float32 array in torch order [out, in]} of a Gemma 3 decoder; the output
    is tied to the token embedding (no output.weight), as in every Gemma 3.

    qk_norm=False leaves out the q/k norms (Gemma 2).
    Norm weights are stored the way llama.cpp's converter writes Gemma's, 1 + w: llama.cpp
    multiplies by the stored value, transformers' GGUF loader subtracts 1 again for its (1 + w).
    Scales keep activations O(1): embeddings of std 0.25 times sqrt(n_embd) = 8 in the model,
    unit-RMS q and k after the per-head q/k norms (scores of std ~1 at 1/sqrt(head_dim)),
    post-attention norms that make the attention's residual updates unit-RMS, post-FFN norms a quarter of that
    (FFN_OUT_SCALE), logits of std ~2.
    """
    normal, norm_weight = samplers(rng)
    proj = 1.0 / np.sqrt(n_embd)
    w = {"token_embd.weight": normal(0.25, n_vocab, n_embd)}
    for i in range(n_layer):
        w[f"blk.{i}.attn_norm.weight"] = norm_weight(n_embd)
        w[f"blk.{i}.attn_q.weight"] = normal(proj, n_head * head_dim, n_embd)
        if qk_norm:
            w[f"blk.{i}.attn_q_norm.weight"] = norm_weight(head_dim)
        w[f"blk.{i}.attn_k.weight"] = normal(proj, n_head_kv * head_dim, n_embd)
        if qk_norm:
            w[f"blk.{i}.attn_k_norm.weight"] = norm_weight(head_dim)
        w[f"blk.{i}.attn_v.weight"] = normal(proj, n_head_kv * head_dim, n_embd)
        w[f"blk.{i}.attn_output.weight"] = normal(1.0 / np.sqrt(n_head * head_dim), n_embd, n_head * head_dim)
        w[f"blk.{i}.post_attention_norm.weight"] = norm_weight(n_embd)
        w[f"blk.{i}.ffn_norm.weight"] = norm_weight(n_embd)
        w[f"blk.{i}.ffn_gate.weight"] = normal(proj, n_ff, n_embd)
        w[f"blk.{i}.ffn_up.weight"] = normal(proj, n_ff, n_embd)
        w[f"blk.{i}.ffn_down.weight"] = normal(1.0 / np.sqrt(n_ff), n_embd, n_ff)
        # a multiple of 2^-24, so that transformers' float32 (w - 1) is exact for this w near 0.25 too
        w[f"blk.{i}.post_ffw_norm.weight"] = np.round(FFN_OUT_SCALE * norm_weight(n_embd) * 2**24) / 2**24
    w["output_norm.weight"] = norm_weight(n_embd)
    return w


def write_tiny_gemma3(path, *, weight_type="f32", n_ctx_train=64, n_embd=64, n_head=4, n_head_kv=2,
                      head_dim=32, n_layer=4, n_ff=128, n_vocab=320, sliding_window=10, swa_pattern=2,
                      rope_freq_base=1e6, rope_freq_base_swa=10000.0, rms_eps=1e-6, seed=0):
    """Write a random-weight Gemma 3 (architecture "gemma3") GGUF to path; returns its Path.

    What llama.cpp's gemma3 graph (src/models/gemma3.cpp) reads: sliding-window layers (n_swa =
    sliding_window, RoPE base rope_freq_base_swa) and global layers (RoPE base rope_freq_base),
    head_dim independent of n_embd / n_head (attention.key_length), per-head q/k norms, post-
    attention and post-FFN norms, a GELU-gated FFN, NeoX RoPE, tied output. swa_pattern: every
    swa_pattern-th layer is global (llama.cpp's set_swa_pattern: layer i slides iff
    i % swa_pattern < swa_pattern - 1); the default 2 makes layers 0, 2 sliding and 1, 3 global.
    None leaves the key out, as the HF converter does for Gemma 3: llama.cpp then uses 6.
    Same tokenizer as the tiny llama.
    """
    def add_keys(writer):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(rope_freq_base)
        writer.add_rope_freq_base_swa(rope_freq_base_swa)
        writer.add_sliding_window(sliding_window)
        if swa_pattern is not None:
            writer.add_sliding_window_pattern(swa_pattern)
        writer.add_layer_norm_rms_eps(rms_eps)

    return write_arch_gguf(path, "gemma3", weight_type, seed, n_vocab, n_ctx_train, n_embd, n_layer, n_ff, n_head,
                           n_head_kv, lambda rng, n: random_gemma3_weights(rng, n, n_embd, n_head, n_head_kv, head_dim,
                                                                           n_layer, n_ff), add_keys)


def write_tiny_gemma2(path, *, weight_type="f32", n_ctx_train=64, n_embd=64, n_head=4, n_head_kv=2,
                      head_dim=32, n_layer=4, n_ff=128, n_vocab=320, sliding_window=10, rope_freq_base=10000.0,
                      attn_logit_softcapping=2.0, final_logit_softcapping=30.0, rms_eps=1e-6, seed=0):
    """Write a random-weight Gemma 2 (architecture "gemma2") GGUF to path; returns its Path.

    What llama.cpp's gemma2 graph (src/models/gemma2.cpp) reads: the tiny gemma3's weights without
    the q/k norms, every 2nd layer global (llama.cpp's pattern for gemma2: layers 0, 2 slide, n_swa =
    sliding_window), one RoPE base for both kinds of layers, and the two soft-caps. The attention cap
    is 2 (Gemma 2's own is 50): the tiny model's scores, of std ~1, reach it, so that soft-capping
    changes them (a cap applied to one block of scores and not the other would show).
    """
    def add_keys(writer):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(rope_freq_base)
        writer.add_sliding_window(sliding_window)
        writer.add_attn_logit_softcapping(attn_logit_softcapping)
        writer.add_final_logit_softcapping(final_logit_softcapping)
        writer.add_layer_norm_rms_eps(rms_eps)

    return write_arch_gguf(path, "gemma2", weight_type, seed, n_vocab, n_ctx_train, n_embd, n_layer, n_ff, n_head,
                           n_head_kv, lambda rng, n: random_gemma3_weights(rng, n, n_embd, n_head, n_head_kv, head_dim,
                                                                           n_layer, n_ff, qk_norm=False), add_keys)


# ----------------------------------------------------------------------------- phi2

def random_phi2_weights(rng, n_vocab, n_embd, n_head, n_layer, n_ff):
    """{gguf tensor name: float32 array in torch order [out, in]} of a Phi-2 decoder: LayerNorms
    with biases, a fused attn_qkv with its bias, biases on every projection and on the logits.
    Scales keep activations O(1): unit-variance embeddings (LayerNorm normalizes them anyway),
    scores of std ~2 (so that Self-Extend's grouping moves the logits), attention and FFN residual
    updates of RMS ~1 and ~0.25 (the FFN's GELU is llama.cpp's float16 table, see FFN_OUT_SCALE)."""
    normal, norm_weight = samplers(rng)
    proj = 1.0 / np.sqrt(n_embd)
    w = {"token_embd.weight": normal(1.0, n_vocab, n_embd)}
    for i in range(n_layer):
        w[f"blk.{i}.attn_norm.weight"] = norm_weight(n_embd)
        w[f"blk.{i}.attn_norm.bias"] = normal(0.1, n_embd)
        w[f"blk.{i}.attn_qkv.weight"] = normal(1.5 * proj, 3 * n_embd, n_embd)
        w[f"blk.{i}.attn_qkv.bias"] = normal(0.1, 3 * n_embd)
        w[f"blk.{i}.attn_output.weight"] = normal(proj, n_embd, n_embd)
        w[f"blk.{i}.attn_output.bias"] = normal(0.1, n_embd)
        w[f"blk.{i}.ffn_up.weight"] = normal(proj, n_ff, n_embd)
        w[f"blk.{i}.ffn_up.bias"] = normal(0.1, n_ff)
        w[f"blk.{i}.ffn_down.weight"] = normal(FFN_OUT_SCALE / np.sqrt(n_ff), n_embd, n_ff)
        w[f"blk.{i}.ffn_down.bias"] = normal(0.1, n_embd)
    w["output_norm.weight"] = norm_weight(n_embd)
    w["output_norm.bias"] = normal(0.1, n_embd)
    w["output.weight"] = normal(proj * 2, n_vocab, n_embd)
    w["output.bias"] = normal(0.1, n_vocab)
    return w


def write_tiny_phi2(path, *, weight_type="f32", n_ctx_train=64, n_embd=64, n_head=4, n_layer=2, n_ff=128,
                    n_vocab=320, rope_dims=8, norm_eps=1e-5, seed=0):
    """Write a random-weight Phi-2 (architecture "phi2") GGUF to path; returns its Path.

    What llama.cpp's phi2 graph (src/models/phi2.cpp) reads: LayerNorm with biases, attention and an
    ungated GELU FFN in parallel on the same normed input, a fused attn_qkv, biases everywhere, NeoX
    RoPE on the first rope_dims of each head's 16 dimensions (partial rotary, as Phi-2's 32 of 80).
    No GQA (Phi-2 has none). Same tokenizer as the tiny llama.
    """
    def add_keys(writer):
        writer.add_rope_dimension_count(rope_dims)
        writer.add_layer_norm_eps(norm_eps)

    return write_arch_gguf(path, "phi2", weight_type, seed, n_vocab, n_ctx_train, n_embd, n_layer, n_ff, n_head,
                           n_head, lambda rng, n: random_phi2_weights(rng, n, n_embd, n_head, n_layer, n_ff), add_keys)


# ----------------------------------------------------------------------------- phi3

def random_phi3_weights(rng, n_vocab, n_embd, n_head, n_head_kv, n_layer, n_ff, rope_dims):
    """{gguf tensor name: float32 array in torch order [out, in]} of a Phi-3 decoder: the tiny llama's
    scales, with Q, K and V in one attn_qkv and the gate and up projections in one ffn_up (gate first);
    no biases. Then LongRoPE's two sets of rope_dims / 2 factors, clearly apart: short ones in [1, 1.2]
    (Phi-3's are near 1), long ones in [2, 8]."""
    normal, norm_weight = samplers(rng)
    head_dim = n_embd // n_head
    proj = 1.0 / np.sqrt(n_embd)
    w = {"token_embd.weight": normal(0.5, n_vocab, n_embd)}
    for i in range(n_layer):
        w[f"blk.{i}.attn_norm.weight"] = norm_weight(n_embd)
        w[f"blk.{i}.attn_qkv.weight"] = normal(proj, (n_head + 2 * n_head_kv) * head_dim, n_embd)
        w[f"blk.{i}.attn_output.weight"] = normal(0.06, n_embd, n_embd)
        w[f"blk.{i}.ffn_norm.weight"] = norm_weight(n_embd)
        w[f"blk.{i}.ffn_up.weight"] = normal(proj, 2 * n_ff, n_embd)
        w[f"blk.{i}.ffn_down.weight"] = normal(0.06, n_embd, n_ff)
    w["output_norm.weight"] = norm_weight(n_embd)
    w["output.weight"] = normal(0.25, n_vocab, n_embd)
    w["rope_factors_short.weight"] = rng.uniform(1.0, 1.2, size=rope_dims // 2).astype(np.float32)
    w["rope_factors_long.weight"] = rng.uniform(2.0, 8.0, size=rope_dims // 2).astype(np.float32)
    return w


def write_tiny_phi3(path, *, weight_type="f32", n_ctx_train=64, original_context_length=32, n_embd=64, n_head=4,
                    n_head_kv=2, n_layer=2, n_ff=128, n_vocab=320, rope_dims=12, rope_freq_base=10000.0,
                    sliding_window=12, rms_eps=1e-5, seed=0):
    """Write a random-weight Phi-3 (architecture "phi3") GGUF to path; returns its Path.

    What llama.cpp's phi3 graph (src/models/phi3.cpp) reads: RMSNorms, a fused attn_qkv, a fused ffn_up
    (SwiGLU of its two halves), NeoX RoPE on the first rope_dims of each head's 16 dimensions (partial
    rotary, as Phi-4-mini's 96 of 128), GQA, and LongRoPE as llama.cpp's converter writes a 128k Phi-3:
    rope_factors_short / rope_factors_long (random_phi3_weights), rope.scaling.original_context_length
    (the short factors' context; llama.cpp takes the long factors where n_ctx exceeds it, as every
    context of the tiny one, 32, does) and rope.scaling.attn_factor sqrt(1 + ln(s) / ln(original)),
    s = n_ctx_train / original (1.095 for 64 / 32). attention.sliding_window as Phi-3's converter writes
    it, which llama.cpp turns off ("Phi SWA is currently disabled"): the model attends to every cached
    token. Same tokenizer as the tiny llama; general.name leaves out "phi3", by which llama.cpp would set
    attributes of Phi-3's SentencePiece tokens (<s>, </s>, <unk>) that the tiny vocabulary does not have.
    """
    scale = n_ctx_train / original_context_length
    attn_factor = math.sqrt(1 + math.log(scale) / math.log(original_context_length)) if scale > 1 else 1.0

    def add_keys(writer):
        writer.add_rope_dimension_count(rope_dims)
        writer.add_rope_freq_base(rope_freq_base)
        writer.add_rope_scaling_orig_ctx_len(original_context_length)
        writer.add_rope_scaling_attn_factors(attn_factor)
        writer.add_sliding_window(sliding_window)
        writer.add_layer_norm_rms_eps(rms_eps)

    return write_arch_gguf(path, "phi3", weight_type, seed, n_vocab, n_ctx_train, n_embd, n_layer, n_ff, n_head,
                           n_head_kv, lambda rng, n: random_phi3_weights(rng, n, n_embd, n_head, n_head_kv, n_layer,
                                                                         n_ff, rope_dims), add_keys,
                           name=f"tiny-longrope-{weight_type}-seed{seed}")


def write_unsupported_arch_gguf(path, arch="mamba"):
    """A small valid GGUF whose architecture the reference decoder does not support."""
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --shape: random llama weights at a real model's size, for speed measurements (scripts/gpu_check.sh):
# weights do not change speed. The vocabulary stays the tiny one (its BPE is trained on the fly).
SHAPES = {
    "smollm2": dict(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, n_ctx_train=8192,
                    rope_freq_base=100000.0),  # SmolLM2-135M
    "llama-1b": dict(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_ctx_train=8192,
                     rope_freq_base=500000.0),  # Llama 3.2 1B's decoder
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .gguf path")
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES) + ["gemma2", "gemma3", "phi2", "phi3"])
    parser.add_argument("--type", dest="weight_type", default="f32", choices=sorted(WEIGHT_TYPES))
    parser.add_argument("--n-ctx-train", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tied-output", action="store_true", help="no output.weight")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="llama weights in a real model's shape (its trained context too), for speed runs")
    args = parser.parse_args(argv)
    if args.shape:
        if args.arch != "llama":
            parser.error("--shape writes llama weights; leave --arch at llama")
        path = write_tiny_model(args.out, "llama", weight_type=args.weight_type, seed=args.seed,
                                tied_output=args.tied_output, **SHAPES[args.shape])
        print(path)
        return
    if args.arch in ("gemma2", "gemma3", "phi2", "phi3"):  # their output is always tied (phi2, phi3: never)
        write = {"gemma2": write_tiny_gemma2, "gemma3": write_tiny_gemma3, "phi2": write_tiny_phi2,
                 "phi3": write_tiny_phi3}[args.arch]
        path = write(args.out, weight_type=args.weight_type, n_ctx_train=args.n_ctx_train, seed=args.seed)
    else:
        path = write_tiny_model(args.out, args.arch, weight_type=args.weight_type, n_ctx_train=args.n_ctx_train,
                                seed=args.seed, tied_output=args.tied_output)
    print(path)


if __name__ == "__main__":
    main()
