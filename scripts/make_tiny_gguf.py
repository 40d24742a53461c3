#!/usr/bin/env python3
"""Write small random-weight llama-architecture GGUF files for tests.

The files load in llama.cpp and transformers: llama architecture, GQA, normal RoPE, a
byte-level BPE (GPT-2 style) vocabulary of a few hundred tokens that tokenizes any text,
ChatML special tokens and chat template. Same seed -> same weights for every weight type,
so an F32, F16 and Q8_0 file differ only by storage precision.

    python scripts/make_tiny_gguf.py OUT.gguf --type f32|f16|q8_0 [--n-ctx-train 64] [--seed 0]

Importable: write_tiny_llama(path, ...), write_unsupported_arch_gguf(path).
"""
import argparse
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

def random_llama_weights(rng, n_vocab, n_embd, n_head, n_head_kv, n_layer, n_ff, tied_output):
    """{gguf tensor name: float32 array in torch order [out, in]}.

    Scales keep activations O(1): q, k, v entries ~1 from a unit-RMS input, attention scores of
    std ~1 (not uniform, so positions matter), residual updates ~0.5, logits of std ~2.
    """
    head_dim = n_embd // n_head

    def normal(std, *shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

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
    return w


def add_weight(writer, name, array, qtype):
    """Matrices in qtype; 1-D tensors (norms) stay F32, as llama.cpp's converter keeps them."""
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def write_tiny_llama(path, *, weight_type="f32", n_ctx_train=64, n_embd=64, n_head=4,
                     n_head_kv=2, n_layer=2, n_ff=128, n_vocab=320, rope_freq_base=10000.0,
                     rms_eps=1e-5, tied_output=False, seed=0):
    """Write a random-weight llama GGUF to path and return path (as a Path)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    qtype, file_type = WEIGHT_TYPES[weight_type]
    tokens, token_types, merges = tiny_vocab(n_vocab)
    weights = random_llama_weights(np.random.default_rng(seed), len(tokens), n_embd, n_head,
                                   n_head_kv, n_layer, n_ff, tied_output)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-{weight_type}-seed{seed}")
    writer.add_file_type(file_type)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(rms_eps)
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
    for name, array in weights.items():
        add_weight(writer, name, array, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .gguf path")
    parser.add_argument("--type", dest="weight_type", default="f32", choices=sorted(WEIGHT_TYPES))
    parser.add_argument("--n-ctx-train", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tied-output", action="store_true", help="no output.weight")
    args = parser.parse_args(argv)
    path = write_tiny_llama(args.out, weight_type=args.weight_type, n_ctx_train=args.n_ctx_train,
                            seed=args.seed, tied_output=args.tied_output)
    print(path)


if __name__ == "__main__":
    main()
