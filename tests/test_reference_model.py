"""ReferenceModel on the tiny GGUF fixtures: prefill vs decode, KV-cache operations, errors."""

import pytest
import torch

from selfextend_gguf.reference import GGUFError, ReferenceModel

N = 150          # crosses the tiny models' trained context (64) more than twice
DECODE_TOL = 1e-10  # float64; prefill and decode differ only by summation order (~1e-14)

MODES = [
    dict(mode="vanilla"),
    dict(mode="self_extend", group_size=4, window=16),
    dict(mode="self_extend", group_size=3, window=10),   # window not a multiple of group_size
    dict(mode="self_extend", group_size=2, window=1),
    dict(mode="chunked", group_size=4, window=16, n_batch=1),
    dict(mode="chunked", group_size=4, window=16, n_batch=1, pos_div_sign_bug=True),
]


def tokens(n=N, seed=0):
    return torch.randint(0, 317, (n,), generator=torch.Generator().manual_seed(seed))


def mode_id(m):
    return "-".join(str(v) for v in m.values())


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_prefill_equals_token_by_token_decode(tiny_reference, mode):
    toks = tokens()
    prefill = tiny_reference.forward(toks, **mode)
    cache = tiny_reference.new_cache(**mode)
    decode = torch.cat([tiny_reference.decode(toks[i: i + 1], cache) for i in range(N)])
    assert prefill.shape == (N, tiny_reference.hparams.n_vocab)
    torch.testing.assert_close(decode, prefill, rtol=0, atol=DECODE_TOL)
    assert len(cache) == N


@pytest.mark.parametrize("mode", MODES[:4], ids=mode_id)
def test_prefill_equals_decode_in_uneven_chunks(tiny_reference, mode):
    toks = tokens()
    prefill = tiny_reference.forward(toks, **mode)
    cache = tiny_reference.new_cache(**mode)
    cuts = [0, 37, 38, 64, 65, 101, N]
    decode = torch.cat([tiny_reference.decode(toks[a:b], cache) for a, b in zip(cuts, cuts[1:])])
    torch.testing.assert_close(decode, prefill, rtol=0, atol=DECODE_TOL)


@pytest.mark.parametrize("n_batch", [7, 16, 32, 64])
@pytest.mark.parametrize("bug", [False, True])
def test_chunked_prefill_equals_decode_in_batches(tiny_reference, n_batch, bug):
    """forward() uses the closed-form positions; decode() replays completion.cpp's seq_add/seq_div."""
    toks = tokens()
    mode = dict(mode="chunked", group_size=4, window=16, n_batch=n_batch, pos_div_sign_bug=bug)
    prefill = tiny_reference.forward(toks, **mode)
    decode = tiny_reference.decode_in_batches(toks, tiny_reference.new_cache(**mode), n_batch)
    torch.testing.assert_close(decode, prefill, rtol=0, atol=DECODE_TOL)


def test_group_size_1_and_large_window_equal_vanilla(tiny_reference):
    toks = tokens()
    vanilla = tiny_reference.forward(toks)
    assert torch.equal(tiny_reference.forward(toks, mode="self_extend", group_size=1, window=8), vanilla)
    assert torch.equal(tiny_reference.forward(toks, mode="self_extend", group_size=4, window=N), vanilla)
    assert torch.equal(tiny_reference.forward(toks, mode="chunked", group_size=4, window=16, n_batch=N), vanilla)
    torch.testing.assert_close(tiny_reference.forward(toks, mode="chunked", group_size=1, window=16, n_batch=1),
                               vanilla, rtol=0, atol=DECODE_TOL)


def test_modes_differ_beyond_the_window(tiny_reference):
    toks = tokens()
    vanilla = tiny_reference.forward(toks)
    se = tiny_reference.forward(toks, mode="self_extend", group_size=4, window=16)
    ch = tiny_reference.forward(toks, mode="chunked", group_size=4, window=16, n_batch=1)
    torch.testing.assert_close(se[:17], vanilla[:17], rtol=0, atol=1e-12)
    assert (se[17:] - vanilla[17:]).abs().max() > 1e-2
    assert (ch[17:] - se[17:]).abs().max() > 1e-2


def test_rewind_then_reevaluate(tiny_reference):
    """Prefill 100 tokens, rewind to 60 (llama_memory_seq_rm(60, -1)), decode other tokens."""
    a, b = tokens(100, seed=1), tokens(40, seed=2)
    mode = dict(mode="self_extend", group_size=4, window=16)
    cache = tiny_reference.new_cache(**mode)
    tiny_reference.decode(a, cache)
    cache.truncate(60)
    assert len(cache) == 60 and cache.n_past == 60
    got = tiny_reference.decode(b, cache)
    expected = tiny_reference.forward(torch.cat((a[:60], b)), **mode)[60:]
    torch.testing.assert_close(got, expected, rtol=0, atol=DECODE_TOL)


def test_two_independent_sequences_and_fork(tiny_reference):
    a, b = tokens(90, seed=3), tokens(90, seed=4)
    mode = dict(mode="self_extend", group_size=2, window=8)
    ca, cb = tiny_reference.new_cache(**mode), tiny_reference.new_cache(**mode)
    out_a, out_b = [], []
    for i in range(0, 90, 10):  # interleaved
        out_a.append(tiny_reference.decode(a[i: i + 10], ca))
        out_b.append(tiny_reference.decode(b[i: i + 10], cb))
    torch.testing.assert_close(torch.cat(out_a), tiny_reference.forward(a, **mode), rtol=0, atol=DECODE_TOL)
    torch.testing.assert_close(torch.cat(out_b), tiny_reference.forward(b, **mode), rtol=0, atol=DECODE_TOL)
    fork = ca.copy()
    x = tiny_reference.decode(b[:5], fork)
    y = tiny_reference.decode(b[:5], ca)
    assert torch.equal(x, y) and len(fork) == len(ca) == 95


def test_chunked_cache_cannot_rewind(tiny_reference):
    cache = tiny_reference.new_cache(mode="chunked", group_size=2, window=8)
    tiny_reference.decode(tokens(20), cache)
    with pytest.raises(ValueError, match="chunked"):
        cache.truncate(10)


def test_float32_model_close_to_float64(tiny_reference):
    toks = tokens()
    m32 = tiny_reference.to(torch.float32)
    for mode in MODES[:2] + MODES[4:5]:
        a = tiny_reference.forward(toks, **mode)
        b = m32.forward(toks, **mode)
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-4)


def test_fixtures_load_with_their_storage_types(tiny_gguf_paths, tiny_reference):
    toks = tokens(80)
    base = tiny_reference.forward(toks)
    for kind, tol in (("f16", 0.05), ("q8_0", 0.2)):
        logits = ReferenceModel.from_gguf(tiny_gguf_paths[kind]).forward(toks)
        diff = (logits - base).abs().max().item()
        assert 0 < diff < tol, (kind, diff)  # same weights, stored at lower precision
    tied = ReferenceModel.from_gguf(tiny_gguf_paths["f32_tied"])
    assert tied.tied_output and not tiny_reference.tied_output
    hp = tiny_reference.hparams
    assert (hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_layer, hp.n_ctx_train) == (4, 2, 16, 2, 64)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="self_extend", group_size=0, window=8), "group_size"),
    (dict(mode="self_extend", group_size=2, window=0), "window"),
    (dict(mode="self_extend", group_size=2), "window"),
    (dict(mode="chunked", group_size=-1, window=8), "group_size"),
    (dict(mode="chunked", group_size=3, window=8), "window % group_size"),
    (dict(mode="chunked", group_size=2, window=8, n_batch=0), "n_batch"),
    (dict(mode="longrope"), "unknown attention mode"),
])
def test_bad_arguments_raise(tiny_reference, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_reference.forward(tokens(10), **kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_reference.new_cache(**kwargs)


def test_bad_tokens_and_dtype_raise(tiny_reference, tiny_f32_gguf):
    with pytest.raises(ValueError, match="token ids"):
        tiny_reference.forward([0, 5000])
    with pytest.raises(ValueError, match="empty"):
        tiny_reference.forward([])
    with pytest.raises(ValueError, match="dtype"):
        ReferenceModel.from_gguf(tiny_f32_gguf, dtype=torch.float16)


def test_unsupported_architecture_raises(tmp_path, make_tiny_gguf):
    path = make_tiny_gguf.write_unsupported_arch_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(GGUFError, match="unsupported architecture 'mamba'"):
        ReferenceModel.from_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 100])
def test_truncated_file_raises(tmp_path, tiny_f32_gguf, keep):
    data = tiny_f32_gguf.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:n])
    with pytest.raises(GGUFError, match="truncated"):
        ReferenceModel.from_gguf(path)


def test_not_a_gguf_and_missing_file_raise(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="junk.gguf"):
        ReferenceModel.from_gguf(junk)
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        ReferenceModel.from_gguf(tmp_path / "nothing.gguf")
