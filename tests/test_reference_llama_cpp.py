"""The reference against llama.cpp itself (through llama-cpp-python's C bindings), on the tiny
F32 fixture with an F32 KV cache so that only float32 rounding separates the two.

Uses the project's libllama (selfextend_gguf._native.load_llama_cpp); skipped where none loads.

The chunked test replays upstream llama-completion's Self-Extend loop (tools/completion/completion.cpp)
with the real llama_memory_seq_add / llama_memory_seq_div and compares with the reference
"chunked" mode. The pinned llama.cpp records the K-shift of seq_div with the wrong sign
(src/llama-kv-cells.h, pos_div: `shift[i] += p_old - pos[i]`), so stock llama.cpp matches the
reference with pos_div_sign_bug=True; patch 0001 fixes that line, and the patched library matches
pos_div_sign_bug=False (upstream's approximation as designed) and clearly differs from the bug.
"""
import numpy as np
import pytest
import torch

TOL = 1e-4  # measured ~2.5e-6


@pytest.fixture(scope="module")
def llama_cpp():
    """llama_cpp bound to the project's (patched) libllama; a process loads only one libllama,
    so never `import llama_cpp` directly here."""
    from selfextend_gguf._native import load_llama_cpp
    try:
        return load_llama_cpp()
    except ImportError as e:
        pytest.skip(f"no loadable libllama for llama-cpp-python here ({e})")


def open_f32(llama_cpp, path, n_batch):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=n_batch, n_ubatch=n_batch,
                           logits_all=True, verbose=False, type_k=0, type_v=0)  # GGML_TYPE_F32 cache


def decode_batch(llama_cpp, llm, batch, tokens, first_pos):
    """llama_decode tokens at positions first_pos.. (sequence 0); their logits [n, n_vocab]."""
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), first_pos + i, 1, 1
        batch.seq_id[i][0] = 0
    assert llama_cpp.llama_decode(llm.ctx, batch) == 0
    n_vocab = llm.n_vocab()
    return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(n_vocab,)).copy()
                     for i in range(len(tokens))])


def completion_self_extend(llama_cpp, llm, tokens, G, W, n_batch):
    """llama-completion's batch loop with --grp-attn-n G --grp-attn-w W -b n_batch."""
    mem = llama_cpp.llama_get_memory(llm.ctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    n_past = ga_i = 0
    logits = []
    try:
        for start in range(0, len(tokens), n_batch):
            while n_past >= ga_i + W:
                ib, bd = (G * ga_i) // W, (W // G) * (G - 1)
                dd = (W // G) - ib * bd - W
                llama_cpp.llama_memory_seq_add(mem, 0, ga_i, n_past, ib * bd)
                llama_cpp.llama_memory_seq_div(mem, 0, ga_i + ib * bd, ga_i + ib * bd + W, G)
                llama_cpp.llama_memory_seq_add(mem, 0, ga_i + ib * bd + W, n_past + ib * bd, dd)
                n_past -= bd
                ga_i += W // G
            chunk = tokens[start: start + n_batch]
            logits.append(decode_batch(llama_cpp, llm, batch, chunk, n_past))
            n_past += len(chunk)
    finally:
        llama_cpp.llama_batch_free(batch)
    return np.concatenate(logits)


def test_vanilla_matches_llama_cpp(llama_cpp, tiny_f32_gguf, tiny_reference):
    tokens = torch.randint(0, 317, (150,), generator=torch.Generator().manual_seed(7)).tolist()
    llm = open_f32(llama_cpp, tiny_f32_gguf, 512)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    try:
        got = decode_batch(llama_cpp, llm, batch, tokens, 0)
    finally:
        llama_cpp.llama_batch_free(batch)
    diff = np.abs(got - tiny_reference.forward(tokens).numpy()).max()
    print(f"vanilla: max|llama.cpp - reference| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("G,W,n_batch", [(4, 16, 1), (2, 8, 32), (3, 12, 7)])
def test_chunked_matches_llama_completion_loop(llama_cpp, tiny_f32_gguf, tiny_reference, G, W, n_batch):
    tokens = torch.randint(0, 317, (150,), generator=torch.Generator().manual_seed(8)).tolist()
    got = completion_self_extend(llama_cpp, open_f32(llama_cpp, tiny_f32_gguf, max(n_batch, 8)),
                                 tokens, G, W, n_batch)
    diffs = {}
    for bug in (False, True):
        ref = tiny_reference.forward(tokens, mode="chunked", group_size=G, window=W, n_batch=n_batch,
                                     pos_div_sign_bug=bug)
        diffs[bug] = np.abs(got - ref.numpy()).max()
    print(f"chunked G={G} W={W} n_batch={n_batch}: max|diff| fixed sign {diffs[False]:.3g}, "
          f"pinned sign bug {diffs[True]:.3g}")
    assert diffs[False] <= TOL
    assert diffs[True] > 1e-2


def chunked_logits(path, tokens, G, W, n_batch) -> list:
    """completion_self_extend's logits with the libllama this process loads (JSON values, for
    native_build.run_with_library)."""
    from selfextend_gguf._native import load_llama_cpp
    llama_cpp = load_llama_cpp()
    return completion_self_extend(llama_cpp, open_f32(llama_cpp, path, max(n_batch, 8)), tokens, G, W, n_batch).tolist()


def test_stock_llama_cpp_has_the_pos_div_sign_bug(tiny_f32_gguf, tiny_reference):
    """The same loop on an unpatched build matches the reference's pos_div_sign_bug=True: the
    difference above is patch 0001's."""
    from native_build import run_with_library, unpatched_lib_dir
    G, W, n_batch = 4, 16, 1
    tokens = torch.randint(0, 317, (150,), generator=torch.Generator().manual_seed(8)).tolist()
    got = np.asarray(run_with_library(unpatched_lib_dir(), "test_reference_llama_cpp", "chunked_logits",
                                      str(tiny_f32_gguf), tokens, G, W, n_batch))
    bug = tiny_reference.forward(tokens, mode="chunked", group_size=G, window=W, n_batch=n_batch,
                                 pos_div_sign_bug=True)
    fixed = tiny_reference.forward(tokens, mode="chunked", group_size=G, window=W, n_batch=n_batch)
    assert np.abs(got - bug.numpy()).max() <= TOL
    assert np.abs(got - fixed.numpy()).max() > 1e-2
