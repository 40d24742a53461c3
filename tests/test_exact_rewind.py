"""Exact rewinds (patch 0009, llama-self-extend.h): a context that is rewound (seq_rm of its tail), reused, restored from a
state or copied to another sequence holds, bit for bit, what a fresh context fed the same tokens the
same way holds, as plain llama.cpp does. Self-Extend groups a cell by rotating its normal K once; the
normal K of the most recently grouped cells is kept (Llama(grp_attn_rewind=N), llama-server's
--grp-attn-rewind), and a rewind puts it back instead of rotating the grouped K back.

Schedule of every case: a 100-token prompt in ubatches of 64, 60 single-token steps (the window of
16 slides over 44 cells, each grouped in its turn), a rewind of 30 tokens (inside the default bound,
an eighth of the context but at least 512 tokens: all 256 cells here), then 40 new tokens in one ubatch. The logits of those 40
must equal (==) a fresh context's; with the copies turned off (grp_attn_rewind=0) they differ, so the
comparison can fail. Beyond the bound the re-entering cells are rotated back: that stays within the
parity tolerance of the float64 reference (F32 cache)."""
import numpy as np
import pytest

from selfextend_gguf._native import LLAMA_SELF_EXTEND_OK, llama_set_self_extend
from selfextend_gguf.testing.parity import TOLERANCE, llama_cpp, random_tokens, reference_logits, tiny_llama

F16, Q8_0 = llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_Q8_0
G, W, N_CTX = 4, 16, 200
PROMPT, STEPS, KEEP, NEW = 100, 60, 130, 40


@pytest.fixture(scope="module")
def tiny_hd64_gguf(tiny_gguf_dir, make_tiny_gguf):
    """Heads of 64, so that a Q8_0 block (32) divides them (see test_parity_kv_types.py)."""
    return make_tiny_gguf.write_tiny_llama(tiny_gguf_dir / "tiny-f32-hd64-rewind.gguf", weight_type="f32",
                                           n_embd=128, n_head=2, n_head_kv=1)


def first_and_second():
    return random_tokens(PROMPT + STEPS, seed=1), random_tokens(NEW, seed=2)


def feed(llm, tokens):
    """The schedule's first part: the prompt in one eval (ubatches of 64), the rest one token at a time."""
    llm.eval(tokens[:PROMPT])
    for token in tokens[PROMPT:]:
        llm.eval([token])


def rewound_logits(path, type_k, type_v, flash_attn, rewind=-1) -> np.ndarray:
    first, second = first_and_second()
    llm = tiny_llama(path, N_CTX, G, W, type_k=type_k, type_v=type_v, n_batch=64, n_ubatch=64,
                     flash_attn=flash_attn, grp_attn_rewind=rewind)
    feed(llm, first)
    llm.n_tokens = KEEP  # llama-cpp-python's rewind: the next eval removes cells KEEP.. (seq_rm)
    llm.eval(second)
    return np.asarray(llm.scores[KEEP:KEEP + NEW]).copy()


def fresh_logits(path, type_k, type_v, flash_attn) -> np.ndarray:
    first, second = first_and_second()
    llm = tiny_llama(path, N_CTX, G, W, type_k=type_k, type_v=type_v, n_batch=64, n_ubatch=64,
                     flash_attn=flash_attn)
    feed(llm, first[:KEEP])
    llm.eval(second)
    return np.asarray(llm.scores[KEEP:KEEP + NEW]).copy()


CACHES = [(F16, F16, False), (F16, F16, True), (Q8_0, Q8_0, True), (Q8_0, F16, False)]
IDS = ["f16-no_flash", "f16-flash", "q8_0-flash", "q8_0_k-no_flash"]


@pytest.mark.parametrize("type_k,type_v,flash_attn", CACHES, ids=IDS)
def test_rewind_is_bit_identical_to_a_fresh_context(tiny_hd64_gguf, type_k, type_v, flash_attn):
    fresh = fresh_logits(tiny_hd64_gguf, type_k, type_v, flash_attn)
    assert np.array_equal(rewound_logits(tiny_hd64_gguf, type_k, type_v, flash_attn), fresh)
    # without the normal copies the re-entering cells are rotated back: a second rounding, visible
    assert not np.array_equal(rewound_logits(tiny_hd64_gguf, type_k, type_v, flash_attn, rewind=0), fresh)


def test_default_bound_is_an_eighth_of_the_context_at_least_512(tiny_hd64_gguf):
    llm = tiny_llama(tiny_hd64_gguf, N_CTX, G, W, type_k=F16, type_v=F16)
    assert llm.grp_attn_rewind == llm.n_ctx() == 256  # a context shorter than 512: all of it
    long = tiny_llama(tiny_hd64_gguf, 8192, 200, W, type_k=F16, type_v=F16)
    assert long.grp_attn_rewind == 8192 // 8
    assert tiny_llama(tiny_hd64_gguf, N_CTX, G, W, grp_attn_rewind=7).grp_attn_rewind == 7
    assert tiny_llama(tiny_hd64_gguf, N_CTX, 1, None).grp_attn_rewind == 0  # Self-Extend off: nothing kept
    with pytest.raises(ValueError, match="grp_attn_rewind"):
        tiny_llama(tiny_hd64_gguf, N_CTX, G, W, grp_attn_rewind=-2)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
def test_state_saved_after_generation_rewinds_exactly_when_loaded(tiny_hd64_gguf, flash_attn):
    """The state carries the normal copies (Self-Extend state section, version 2): a context loaded from
    it and rewound equals a fresh one, as a llama-server slot restored from --slot-save-path does."""
    first, second = first_and_second()
    make = lambda: tiny_llama(tiny_hd64_gguf, N_CTX, G, W, type_k=F16, type_v=F16, n_batch=64, n_ubatch=64,
                              flash_attn=flash_attn)
    llm = make()
    feed(llm, first)
    state = llm.save_state()
    other = make()
    other.load_state(state)
    other.n_tokens = KEEP
    other.eval(second)
    assert np.array_equal(np.asarray(other.scores[KEEP:KEEP + NEW]), fresh_logits(tiny_hd64_gguf, F16, F16, flash_attn))


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
def test_two_sequences_rewound_together(tiny_hd64_gguf, unified):
    """Two sequences decoded in the same batches (one KV stream, or one each), both rewound, both fed
    new tokens: equal to a fresh context with the same schedule. The second sequence starts as a
    seq_cp of the first's prompt, so their cells are shared (unified) or copied across streams."""
    first, second = first_and_second()
    others = [random_tokens(STEPS, seed=3), random_tokens(NEW, seed=4)]
    base = tiny_llama(tiny_hd64_gguf, 2 * N_CTX, 1, None, n_batch=64, n_ubatch=64)

    def run(rewind: bool) -> np.ndarray:
        params = base.context_params
        params.n_seq_max, params.kv_unified, params.n_ctx, params.n_batch, params.n_ubatch = 2, unified, 2 * N_CTX, 64, 64
        ctx = llama_cpp.llama_init_from_model(base.model, params)
        batch = llama_cpp.llama_batch_init(64, 0, 2)
        try:
            assert llama_set_self_extend(ctx, G, W) == LLAMA_SELF_EXTEND_OK
            mem = llama_cpp.llama_get_memory(ctx)

            def decode(items):  # items: (token, pos, seq)
                for j, (token, pos, seq) in enumerate(items):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, pos, 1, True
                    batch.seq_id[j][0] = seq
                batch.n_tokens = len(items)
                assert llama_cpp.llama_decode(ctx, batch) == 0
                return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(items) * 320,)).reshape(len(items), 320).copy()

            for start in range(0, PROMPT, 50):
                decode([(t, start + i, 0) for i, t in enumerate(first[start:start + 50])])
            llama_cpp.llama_memory_seq_cp(mem, 0, 1, -1, -1)
            steps = STEPS if rewind else KEEP - PROMPT
            for i in range(steps):
                decode([(first[PROMPT + i], PROMPT + i, 0), (others[0][i], PROMPT + i, 1)])
            if rewind:
                for seq in (0, 1):
                    assert llama_cpp.llama_memory_seq_rm(mem, seq, KEEP, -1)
            return decode([(t, KEEP + i, 0) for i, t in enumerate(second[:20])] +
                          [(t, KEEP + i, 1) for i, t in enumerate(others[1][:20])])
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)

    assert np.array_equal(run(rewind=True), run(rewind=False))


def test_rewind_beyond_the_bound_stays_within_the_reference_tolerance(tiny_f32_gguf, tiny_reference):
    """A rewind deeper than grp_attn_rewind rotates the cells it cannot restore back to their normal
    positions (one more rounding): not bit-identical, but still the paper's attention within the parity
    tolerance of the float64 reference (F32 cache)."""
    first, second = first_and_second()
    llm = tiny_llama(tiny_f32_gguf, N_CTX, G, W, n_batch=64, n_ubatch=64, grp_attn_rewind=4)
    feed(llm, first)
    llm.n_tokens = KEEP
    llm.eval(second)
    tokens = first[:KEEP] + second
    error = np.abs(np.asarray(llm.scores[:KEEP + NEW]) - reference_logits(tiny_reference, tokens, G, W)).max()
    assert error <= TOLERANCE, f"max |diff| {error:.2e}"
