"""ggml_mul_mat_concat (patch 0008), the op that writes Self-Extend's blocks of scores side by side without
joining them: on the CPU it must give exactly the bytes of its products joined by ggml_concat, for every
type a KV cache's K takes, for queries that are views (the heads of a chunk, permuted) and for K heads
shared by several query heads, with one thread and with several (they share the work buffer and the
chunk counter of each product). Self-Extend asks for F32 accumulation of its scores on both paths
(ggml_prec_set_acc), which ggml_mul_mat_concat takes for every product."""
import ctypes

import numpy as np
import pytest

from selfextend_gguf._native import lib_dir

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0 = 0, 1, 8
GGML_PREC_F32 = 10
TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "q8_0": GGML_TYPE_Q8_0}


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml():
    base = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib_dir() / "libggml-cpu.so"))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "ggml_init": (p, [InitParams]), "ggml_free": (None, [p]),
        "ggml_new_tensor_3d": (p, [p, ctypes.c_int, i64, i64, i64]),
        "ggml_permute": (p, [p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        "ggml_view_3d": (p, [p, p, i64, i64, i64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]),
        "ggml_mul_mat": (p, [p, p, p]), "ggml_concat": (p, [p, p, p, ctypes.c_int]),
        "ggml_mul_mat_concat": (p, [p, ctypes.POINTER(p), ctypes.POINTER(p), ctypes.c_int]),
        "ggml_new_graph": (p, [p]), "ggml_build_forward_expand": (None, [p, p]),
        "ggml_get_data": (p, [p]), "ggml_nbytes": (ctypes.c_size_t, [p]),
        "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, p, p, i64, i64, i64, p]),
        "ggml_prec_set_acc": (ctypes.c_bool, [p, ctypes.c_int]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(base, name)
        function.restype, function.argtypes = restype, argtypes
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    return base, cpu


def fill(lib, tensor, values: np.ndarray, ggml_type: int) -> None:
    """Write float values into a tensor of ggml_type (rows along the last numpy axis)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    data = lib.ggml_get_data(tensor)
    if ggml_type == GGML_TYPE_F32:
        raw = values.tobytes()
    elif ggml_type == GGML_TYPE_F16:
        raw = values.astype(np.float16).tobytes()
    else:
        n_per_row = values.shape[-1]
        lib.ggml_quantize_chunk(ggml_type, values.ctypes.data, data, 0, values.size // n_per_row, n_per_row, None)
        return
    assert len(raw) == lib.ggml_nbytes(tensor)
    ctypes.memmove(data, raw, len(raw))


def scores(type_k: int, n_threads: int):
    """The blocks' products joined both ways: (ggml_concat of ggml_mul_mat, ggml_mul_mat_concat), as float32."""
    lib, cpu = ggml()
    head, n_tok, n_head, n_head_kv = 64, 24, 4, 2
    n_cells = (80, 48, 32)   # a grouped, a window and a mixed block
    rng = np.random.default_rng(0)

    ctx = lib.ggml_init(InitParams(64 << 20, None, False))
    try:
        # the queries as two views of one tensor, like the heads of a chunk: [head, n_tok, n_head] permuted
        q_all = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head, 2 * n_head, n_tok)
        fill(lib, q_all, rng.standard_normal((n_tok, 2 * n_head, head)), GGML_TYPE_F32)
        row = 4 * head
        queries = [lib.ggml_permute(ctx, lib.ggml_view_3d(ctx, q_all, head, n_head, n_tok, row, 2 * n_head * row,
                                                          offset), 0, 2, 1, 3)
                   for offset in (0, n_head * row)]
        keys = []
        for n in n_cells:
            k = lib.ggml_new_tensor_3d(ctx, type_k, head, n, n_head_kv)
            fill(lib, k, rng.standard_normal((n_head_kv, n, head)), type_k)
            keys.append(k)
        pairs = list(zip(keys, (queries[1], queries[0], queries[1])))

        # both with F32 accumulation, as build_attn_mha_self_extend asks for
        def product(k, q):
            kq = lib.ggml_mul_mat(ctx, k, q)
            assert lib.ggml_prec_set_acc(kq, GGML_PREC_F32)
            return kq

        joined = product(*pairs[0])
        for k, q in pairs[1:]:
            joined = lib.ggml_concat(ctx, joined, product(k, q), 0)
        as_ = (ctypes.c_void_p * 3)(*(k for k, _ in pairs))
        bs_ = (ctypes.c_void_p * 3)(*(q for _, q in pairs))
        in_place = lib.ggml_mul_mat_concat(ctx, as_, bs_, 3)
        assert lib.ggml_prec_set_acc(in_place, GGML_PREC_F32), "ggml_mul_mat_concat takes no accumulator precision"

        graph = lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(graph, joined)
        lib.ggml_build_forward_expand(graph, in_place)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0

        shape = (n_head, n_tok, sum(n_cells))
        read = lambda t: np.ctypeslib.as_array(ctypes.cast(lib.ggml_get_data(t), ctypes.POINTER(ctypes.c_float)),
                                               shape=shape).copy()
        return read(joined), read(in_place)
    finally:
        lib.ggml_free(ctx)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("type_k", TYPES)
def test_mul_mat_concat_writes_exactly_the_joined_products(type_k, n_threads):
    joined, in_place = scores(TYPES[type_k], n_threads)
    assert np.isfinite(joined).all() and np.abs(joined).max() > 1.0   # real products, not zeros
    assert np.array_equal(in_place, joined)
