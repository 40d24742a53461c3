"""Self-Extend position arithmetic against tables worked out by hand."""
import pytest
import torch

from selfextend_gguf.reference.positions import (check_chunked_args, check_group_args,
                                                 chunked_positions, chunked_rope_positions,
                                                 completion_kv_shift, grouped_key_position,
                                                 grouped_query_position, neighbor_mask,
                                                 self_extend_relative_positions)

# ----------------------------------------------------------------------------- exact Self-Extend
# G = 3, W = 5, 12 tokens. Grouped query position q // 3 + 5 - 5 // 3 = q // 3 + 4,
# grouped key position k // 3. A pair uses normal positions when q - k < 5.
G3W5_GROUPED_QUERY = [4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7]
G3W5_GROUPED_KEY = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
# Relative distance RoPE sees for key k (columns) from query q (rows), k <= q.
G3W5_DISTANCE = [
    [0],
    [1, 0],
    [2, 1, 0],
    [3, 2, 1, 0],
    [4, 3, 2, 1, 0],
    [5, 4, 3, 2, 1, 0],                      # k=0: grouped 5 - 0
    [6, 6, 4, 3, 2, 1, 0],                   # k=0,1 grouped: 6 - 0
    [6, 6, 6, 4, 3, 2, 1, 0],
    [6, 6, 6, 5, 4, 3, 2, 1, 0],             # k=3: 6 - 1
    [7, 7, 7, 6, 6, 4, 3, 2, 1, 0],
    [7, 7, 7, 6, 6, 6, 4, 3, 2, 1, 0],
    [7, 7, 7, 6, 6, 6, 5, 4, 3, 2, 1, 0],    # k=6: 7 - 2
]


def test_grouped_positions_hand_worked_g3_w5():
    pos = torch.arange(12)
    assert grouped_query_position(pos, 3, 5).tolist() == G3W5_GROUPED_QUERY
    assert grouped_key_position(pos, 3).tolist() == G3W5_GROUPED_KEY
    # plain ints work too
    assert grouped_query_position(11, 3, 5) == 7 and grouped_key_position(11, 3) == 3


def test_neighbor_mask_hand_worked_g3_w5():
    pos = torch.arange(12)
    mask = neighbor_mask(pos, pos, 5)
    for q in range(12):
        for k in range(q + 1):
            assert bool(mask[q, k]) == (q - k < 5), (q, k)
    assert mask[11].tolist()[:12] == [False] * 7 + [True] * 5


def test_relative_positions_hand_worked_g3_w5():
    pos = torch.arange(12)
    dist = self_extend_relative_positions(pos, pos, 3, 5)
    for q, row in enumerate(G3W5_DISTANCE):
        assert dist[q, : q + 1].tolist() == row, q


def test_relative_positions_stay_below_a_bound():
    """Largest distance is (n - 1) // G + W - W // G, the point of Self-Extend."""
    n, G, W = 1000, 8, 64
    pos = torch.arange(n)
    dist = self_extend_relative_positions(pos, pos, G, W)
    causal = pos[None, :] <= pos[:, None]
    assert int(dist[causal].max()) == (n - 1) // G + W - W // G
    assert int(dist[causal].min()) == 0


def test_group_size_1_positions_are_normal():
    pos = torch.arange(40)
    for W in (1, 3, 16):
        assert torch.equal(self_extend_relative_positions(pos, pos, 1, W),
                           pos[:, None] - pos[None, :])


# ----------------------------------------------------------------------------- chunked (llama-completion)
# G = 2, W = 4, one token per batch (n_batch = 1). Cell positions after each token is decoded,
# worked through completion.cpp's seq_add / seq_div loop by hand:
#   before token 4: seq_div([0, 4) / 2) -> 0 0 1 1, n_past 4 -> 2, ga_i 0 -> 2
#   before token 8: seq_add([2, 6) + 2) -> 4..7, seq_div([4, 8) / 2) -> 2 2 3 3, n_past 6 -> 4
G2W4_CELL_POS = [
    [0],
    [0, 1],
    [0, 1, 2],
    [0, 1, 2, 3],
    [0, 0, 1, 1, 2],
    [0, 0, 1, 1, 2, 3],
    [0, 0, 1, 1, 2, 3, 4],
    [0, 0, 1, 1, 2, 3, 4, 5],
    [0, 0, 1, 1, 2, 2, 3, 3, 4],
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 5],
]
# With the pinned llama.cpp's pos_div sign error, a divided key at p is rotated to 2p - p // 2.
G2W4_ROPE_POS_BUG_AFTER_10 = [0, 2, 3, 5, 6, 8, 9, 11, 4, 5]


def simulate_completion(n_tokens, G, W, n_batch, pos_div_sign_bug=False):
    """Cell/rope positions after each batch, via the literal completion_kv_shift."""
    cell = rope = torch.zeros(0, dtype=torch.long)
    n_past = ga_i = 0
    states = []
    for start in range(0, n_tokens, n_batch):
        cell, rope, n_past, ga_i = completion_kv_shift(cell, rope, n_past, ga_i, G, W, pos_div_sign_bug)
        new = n_past + torch.arange(min(n_batch, n_tokens - start))
        cell, rope = torch.cat((cell, new)), torch.cat((rope, new))
        n_past += len(new)
        states.append((start, cell.clone(), rope.clone(), n_past, ga_i))
    return states


def test_completion_kv_shift_hand_worked_g2_w4():
    states = simulate_completion(10, 2, 4, 1)
    assert [s[1].tolist() for s in states] == G2W4_CELL_POS
    assert all(torch.equal(s[1], s[2]) for s in states)  # without the bug K sits at its position
    assert [s[3] for s in states] == [1, 2, 3, 4, 3, 4, 5, 6, 5, 6]  # n_past
    assert [s[4] for s in states] == [0, 0, 0, 0, 2, 2, 2, 2, 4, 4]  # ga_i
    bug = simulate_completion(10, 2, 4, 1, pos_div_sign_bug=True)
    assert [s[1].tolist() for s in bug] == G2W4_CELL_POS
    assert bug[-1][2].tolist() == G2W4_ROPE_POS_BUG_AFTER_10


def test_chunked_closed_form_hand_worked_g2_w4():
    for n, expected in enumerate(G2W4_CELL_POS, start=1):
        assert chunked_positions(torch.arange(n), n - 1, 2, 4).tolist() == expected
    assert chunked_rope_positions(torch.arange(10), 9, 2, 4, True).tolist() == G2W4_ROPE_POS_BUG_AFTER_10


@pytest.mark.parametrize("G,W", [(2, 4), (2, 8), (3, 12), (4, 16), (4, 32), (8, 16), (1, 8), (5, 5)])
@pytest.mark.parametrize("n_batch", [1, 3, 8, 50])
@pytest.mark.parametrize("bug", [False, True])
def test_chunked_closed_form_matches_literal_simulation(G, W, n_batch, bug):
    for start, cell, rope, n_past, ga_i in simulate_completion(150, G, W, n_batch, bug):
        tokens = torch.arange(len(cell))
        assert torch.equal(cell, chunked_positions(tokens, start, G, W)), start
        assert torch.equal(rope, chunked_rope_positions(tokens, start, G, W, bug)), start
        assert n_past == int(cell[-1]) + 1


def test_chunked_group_size_1_is_identity():
    states = simulate_completion(50, 1, 8, 4)
    assert states[-1][1].tolist() == list(range(50))


# ----------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("G,W,name", [(0, 4, "group_size"), (-2, 4, "group_size"), (2, 0, "window"),
                                      (2, -1, "window"), (1.5, 4, "group_size"), (2, 4.0, "window"),
                                      (True, 4, "group_size")])
def test_bad_group_args_raise(G, W, name):
    with pytest.raises(ValueError, match=name):
        check_group_args(G, W)


def test_chunked_needs_window_multiple_of_group_size():
    with pytest.raises(ValueError, match="window % group_size"):
        check_chunked_args(3, 8)
    with pytest.raises(ValueError, match="n_batch"):
        check_chunked_args(2, 8, 0)
    check_chunked_args(2, 8, 1)
