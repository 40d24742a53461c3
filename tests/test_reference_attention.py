"""RoPE and the three attention functions on random tensors."""
import math

import pytest
import torch

from selfextend_gguf.reference import (Rope, chunked_attention, self_extend_attention,
                                       self_extend_relative_positions, vanilla_attention)

N_HEAD, N_HEAD_KV, HEAD_DIM = 4, 2, 16


def random_qkv(n, dtype=torch.float64, seed=0, n_head_kv=N_HEAD_KV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N_HEAD, n, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(n_head_kv, n, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(n_head_kv, n, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


ROPES = [Rope(HEAD_DIM), Rope(HEAD_DIM, neox=True), Rope(HEAD_DIM, base=1e5, freq_scale=0.25),
         Rope(8, base=500.0)]  # the last rotates half of each head (partial rotary)


# ----------------------------------------------------------------------------- RoPE

def test_rope_normal_layout_rotates_adjacent_pairs():
    """Pair i = (x[2i], x[2i+1]) turns by pos * base^(-2i/d), as ggml_rope NORM does."""
    x = torch.randn(1, 3, HEAD_DIM, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7])
    y = Rope(HEAD_DIM, base=10000.0)(x, pos)
    for t, p in enumerate(pos.tolist()):
        for i in range(HEAD_DIM // 2):
            theta = p * 10000.0 ** (-2 * i / HEAD_DIM)
            a, b = x[0, t, 2 * i].item(), x[0, t, 2 * i + 1].item()
            assert y[0, t, 2 * i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-12)
            assert y[0, t, 2 * i + 1].item() == pytest.approx(a * math.sin(theta) + b * math.cos(theta), abs=1e-12)


def test_rope_neox_is_normal_on_permuted_dims():
    """NeoX pairs (x[i], x[i + d/2]); it equals normal RoPE after interleaving the halves."""
    x = torch.randn(2, 5, HEAD_DIM, dtype=torch.float64)
    pos = torch.arange(5) * 3
    interleave = torch.stack((torch.arange(HEAD_DIM // 2), torch.arange(HEAD_DIM // 2) + HEAD_DIM // 2), -1).flatten()
    neox = Rope(HEAD_DIM, neox=True)(x, pos)
    normal = Rope(HEAD_DIM)(x[..., interleave], pos)
    torch.testing.assert_close(neox[..., interleave], normal, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rope", ROPES)
def test_rope_scores_depend_only_on_relative_position(rope):
    q, k, _ = random_qkv(1)
    a, b = torch.tensor([37]), torch.tensor([11])
    s_ab = (rope(q, a) * rope(k[:1], b)).sum(-1)
    s_rel = (rope(q, a - b) * k[:1]).sum(-1)
    torch.testing.assert_close(s_ab, s_rel, rtol=0, atol=1e-12)
    assert torch.equal(rope(q, torch.tensor([0])), q)  # position 0 is the identity
    torch.testing.assert_close(rope(q, a).norm(dim=-1), q.norm(dim=-1), rtol=1e-13, atol=0)


def test_rope_freq_factors_divide_frequencies():
    ff = torch.linspace(1.0, 4.0, HEAD_DIM // 2, dtype=torch.float64)
    base = Rope(HEAD_DIM).angles(torch.tensor([5]))
    torch.testing.assert_close(Rope(HEAD_DIM, freq_factors=ff).angles(torch.tensor([5])), base / ff)


# ----------------------------------------------------------------------------- exact properties

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rope", ROPES)
def test_group_size_1_equals_vanilla(dtype, rope):
    q, k, v = random_qkv(40, dtype)
    pos = torch.arange(40)
    ref = vanilla_attention(q, k, v, pos, pos, rope)
    for W in (1, 5, 64):
        assert torch.equal(self_extend_attention(q, k, v, pos, pos, 1, W, rope), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_at_least_sequence_equals_vanilla(dtype):
    n = 40
    q, k, v = random_qkv(n, dtype)
    pos = torch.arange(n)
    ref = vanilla_attention(q, k, v, pos, pos)
    for G, W in ((2, n), (4, n + 1), (16, 1000)):
        assert torch.equal(self_extend_attention(q, k, v, pos, pos, G, W), ref)
    # a window shorter than the sequence groups the oldest keys of the last queries
    assert not torch.equal(self_extend_attention(q, k, v, pos, pos, 4, n - 8), ref)


@pytest.mark.parametrize("G,W", [(3, 5), (2, 8), (4, 16), (8, 4)])
def test_self_extend_equals_rope_at_hand_checked_distances(G, W):
    """Independent route: rotate each query by the pair's relative distance (positions.py,
    checked by hand in test_reference_positions) and leave the keys unrotated."""
    n = 48
    q, k, v = random_qkv(n)
    pos = torch.arange(n)
    rope = Rope(HEAD_DIM)
    dist = self_extend_relative_positions(pos, pos, G, W)                  # [n, n]
    k_full, v_full = k.repeat_interleave(N_HEAD // N_HEAD_KV, 0), v.repeat_interleave(N_HEAD // N_HEAD_KV, 0)
    scores = torch.full((N_HEAD, n, n), float("-inf"), dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1):
            qi = rope(q[:, i: i + 1], dist[i, j: j + 1])                    # [n_head, 1, d]
            scores[:, i, j] = (qi[:, 0] * k_full[:, j]).sum(-1) / math.sqrt(HEAD_DIM)
    expected = torch.softmax(scores, -1) @ v_full
    out = self_extend_attention(q, k, v, pos, pos, G, W, rope)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = random_qkv(30)
    pos = torch.arange(30)
    k_rep, v_rep = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    a = self_extend_attention(q, k, v, pos, pos, 4, 8)
    b = self_extend_attention(q, k_rep, v_rep, pos, pos, 4, 8)
    assert torch.equal(a, b)


def test_self_extend_differs_from_vanilla_beyond_window():
    q, k, v = random_qkv(40)
    pos = torch.arange(40)
    a = self_extend_attention(q, k, v, pos, pos, 4, 8)
    b = vanilla_attention(q, k, v, pos, pos)
    # q <= 8: every pair is a neighbor, except (8, 0) whose grouped distance 8 // 4 + 8 - 2 - 0
    # equals its normal distance 8
    assert torch.equal(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_queries_are_causal_and_incremental():
    """Attention of the last 7 queries over all keys equals the last rows of the full call."""
    q, k, v = random_qkv(50)
    pos = torch.arange(50)
    full = self_extend_attention(q, k, v, pos, pos, 3, 6)
    part = self_extend_attention(q[:, 43:], k, v, pos[43:], pos, 3, 6)
    torch.testing.assert_close(part, full[:, 43:], rtol=0, atol=1e-14)


def test_float32_close_to_float64():
    q, k, v = random_qkv(64)
    pos = torch.arange(64)
    a = self_extend_attention(q, k, v, pos, pos, 4, 16)
    b = self_extend_attention(q.float(), k.float(), v.float(), pos, pos, 4, 16)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- chunked

def test_chunked_single_batch_or_group_1_is_vanilla():
    q, k, v = random_qkv(60)
    pos = torch.arange(60)
    ref = vanilla_attention(q, k, v, pos, pos)
    assert torch.equal(chunked_attention(q, k, v, 4, 16, n_batch=60), ref)   # no compression
    torch.testing.assert_close(chunked_attention(q, k, v, 1, 16, n_batch=1), ref, rtol=0, atol=1e-14)


def test_chunked_first_window_is_vanilla_then_differs():
    q, k, v = random_qkv(60)
    pos = torch.arange(60)
    ref = vanilla_attention(q, k, v, pos, pos)
    out = chunked_attention(q, k, v, 4, 16, n_batch=1)
    torch.testing.assert_close(out[:, :16], ref[:, :16], rtol=0, atol=1e-14)
    assert (out[:, 16:] - ref[:, 16:]).abs().max() > 1e-3
    bug = chunked_attention(q, k, v, 4, 16, n_batch=1, pos_div_sign_bug=True)
    assert (bug[:, 16:] - out[:, 16:]).abs().max() > 1e-3


@pytest.mark.parametrize("G,W,name", [(0, 8, "group_size"), (-1, 8, "group_size"),
                                      (2, 0, "window"), (2, -3, "window")])
def test_bad_arguments_raise(G, W, name):
    q, k, v = random_qkv(10)
    pos = torch.arange(10)
    with pytest.raises(ValueError, match=name):
        self_extend_attention(q, k, v, pos, pos, G, W)
    with pytest.raises(ValueError, match=name):
        chunked_attention(q, k, v, G, W)


def test_window_not_multiple_of_group_size():
    """Exact Self-Extend accepts it (W // G); llama-completion's chunked mode asserts against it."""
    q, k, v = random_qkv(10)
    pos = torch.arange(10)
    self_extend_attention(q, k, v, pos, pos, 3, 8)
    with pytest.raises(ValueError, match="window % group_size"):
        chunked_attention(q, k, v, 3, 8)
