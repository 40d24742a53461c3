"""Position arithmetic of Self-Extend, as pure functions on integer tensors.

Notation (Jin et al., "LLM Maybe LongLM", arXiv 2401.01325):
    group_size G       keys far from the query share one position per G tokens
    window     W       the neighbor window: keys with q - k < W keep normal positions

Exact Self-Extend (paper, Algorithm 1; LongLM self_extend_patch/Llama.py):
    neighbor pair (q - k < W):  query at q,                 key at k
    grouped pair  (q - k >= W): query at q // G + W - W // G, key at k // G

Chunked Self-Extend (upstream llama.cpp, tools/completion/completion.cpp, --grp-attn-n G
--grp-attn-w W) instead rewrites the positions stored in the KV cache, chunk by chunk.
"""
import torch


def check_group_args(group_size, window):
    """Raise ValueError unless group_size and window are integers >= 1."""
    for name, value in (("group_size", group_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_chunked_args(group_size, window, n_batch=1):
    """Also n_batch >= 1, and window % group_size == 0, which llama-completion asserts."""
    check_group_args(group_size, window)
    if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
        raise ValueError(f"n_batch must be an int >= 1, got {n_batch!r}")
    if window % group_size != 0:
        raise ValueError(f"chunked mode needs window % group_size == 0 (got window={window}, "
                         f"group_size={group_size}), as llama-completion asserts")


# ----------------------------------------------------------------------------- exact Self-Extend

def grouped_query_position(q_pos, group_size, window):
    """Position of a query when it attends to a grouped (far) key: q // G + W - W // G."""
    return q_pos // group_size + window - window // group_size


def grouped_key_position(k_pos, group_size):
    """Position of a grouped (far) key: k // G."""
    return k_pos // group_size


def neighbor_mask(q_pos, k_pos, window):
    """[n_q, n_k] bool, True where the pair uses normal positions: q - k < W."""
    return (q_pos[:, None] - k_pos[None, :]) < window


def causal_mask(q_pos, k_pos):
    """[n_q, n_k] bool, True where the key is visible: k <= q (llama.cpp masks by position)."""
    return k_pos[None, :] <= q_pos[:, None]


def self_extend_relative_positions(q_pos, k_pos, group_size, window):
    """[n_q, n_k] the relative distance RoPE sees for every pair (meaningful where k <= q)."""
    normal = q_pos[:, None] - k_pos[None, :]
    grouped = (grouped_query_position(q_pos, group_size, window)[:, None]
               - grouped_key_position(k_pos, group_size)[None, :])
    return torch.where(neighbor_mask(q_pos, k_pos, window), normal, grouped)


# ----------------------------------------------------------------------------- chunked (llama-completion)

def completion_kv_shift(cell_pos, rope_pos, n_past, ga_i, group_size, window,
                        pos_div_sign_bug=False):
    """One call of llama-completion's Self-Extend block, run before it decodes a batch.

    Literal transcription of tools/completion/completion.cpp (ga_n = G, ga_w = W):

        while (n_past >= ga_i + ga_w) {
            ib = (ga_n*ga_i)/ga_w;  bd = (ga_w/ga_n)*(ga_n - 1);  dd = (ga_w/ga_n) - ib*bd - ga_w;
            llama_memory_seq_add(mem, 0, ga_i,                n_past,              ib*bd);
            llama_memory_seq_div(mem, 0, ga_i + ib*bd,        ga_i + ib*bd + ga_w, ga_n);
            llama_memory_seq_add(mem, 0, ga_i + ib*bd + ga_w, n_past + ib*bd,      dd);
            n_past -= bd;  ga_i += ga_w/ga_n;
        }

    seq_add / seq_div act on the cells whose position p satisfies p0 <= p < p1.
    cell_pos: [n_cells] int64, the positions llama.cpp records (masking, next shifts).
    rope_pos: [n_cells] int64, the positions the cached keys are rotated to (K-shift).
    pos_div_sign_bug: the pinned llama.cpp records a seq_div K-shift with the wrong sign
    (src/llama-kv-cells.h pos_div: `shift[i] += p_old - pos[i]`, where pos_add adds new - old),
    so a divided key is rotated to 2p - p//G while its recorded position is p//G. True
    reproduces that; False (default) rotates it to p//G, as the algorithm intends.
    Returns (cell_pos, rope_pos, n_past, ga_i).
    """
    if group_size == 1:  # llama-completion skips Self-Extend entirely when ga_n == 1
        return cell_pos, rope_pos, n_past, ga_i
    cell_pos, rope_pos = cell_pos.clone(), rope_pos.clone()
    G, W = group_size, window

    def seq_add(p0, p1, delta):
        if delta != 0 and p0 != p1:
            sel = (cell_pos >= p0) & (cell_pos < p1)
            cell_pos[sel] += delta
            rope_pos[sel] += delta

    def seq_div(p0, p1, d):
        if d != 1 and p0 != p1:
            sel = (cell_pos >= p0) & (cell_pos < p1)
            old = cell_pos[sel]
            cell_pos[sel] = old // d
            rope_pos[sel] += (old - old // d) if pos_div_sign_bug else (old // d - old)

    while n_past >= ga_i + W:
        ib = (G * ga_i) // W
        bd = (W // G) * (G - 1)
        dd = (W // G) - ib * bd - W
        seq_add(ga_i, n_past, ib * bd)
        seq_div(ga_i + ib * bd, ga_i + ib * bd + W, G)
        seq_add(ga_i + ib * bd + W, n_past + ib * bd, dd)
        n_past -= bd
        ga_i += W // G
    return cell_pos, rope_pos, n_past, ga_i


def chunked_positions(token_index, batch_start, group_size, window):
    """Closed form of the positions llama-completion records while decoding a batch.

    batch_start: number of tokens already in the cache when the batch is decoded.
    Before that batch, completion_kv_shift has compressed m = batch_start // W windows, and
    token t (cached or in the batch) sits at
        t // G                    if t < m * W   (compressed windows)
        t - m * (W - W // G)      otherwise      (shifted back by what compression saved)
    """
    m = batch_start // window
    shift = m * (window - window // group_size)
    return torch.where(token_index < m * window, token_index // group_size, token_index - shift)


def chunked_rope_positions(token_index, batch_start, group_size, window, pos_div_sign_bug=False):
    """Positions the keys are rotated to: chunked_positions, except that with pos_div_sign_bug
    a compressed key t is rotated to 2t - t // G (see completion_kv_shift)."""
    pos = chunked_positions(token_index, batch_start, group_size, window)
    if not pos_div_sign_bug:
        return pos
    compressed = token_index < (batch_start // window) * window
    return torch.where(compressed, 2 * token_index - token_index // group_size, pos)
