"""Self-Extend must run on every ggml backend, so its graph may only add operations that the CPU,
CUDA, Metal and Vulkan backends already implement (docs/backends.md lists where each one's
supports_op accepts them, in the pinned llama.cpp). This test records the operations of the real
graphs, with Self-Extend off and on, and fails if the patch starts using anything else."""
import ctypes
import re

import numpy as np
import pytest

from native_build import main_lib_dir, run_with_library
from selfextend_gguf import Llama
from selfextend_gguf._native import lib_dir, load_llama_cpp
from selfextend_gguf.testing.parity import n_gpu_layers_for_tests

llama_cpp = load_llama_cpp()

# the operations the Self-Extend graph may add to llama.cpp's attention (see docs/backends.md)
SELF_EXTEND_OPS = {"ROPE", "CONCAT", "ADD", "GET_ROWS", "SET_ROWS", "CPY", "CONT", "VIEW", "PERMUTE",
                   "RESHAPE", "TRANSPOSE", "MUL_MAT", "SOFT_MAX"}
# and with flash attention on devices without ggml_flash_attn_ext_lse: K and V padded to the doubled head
# size, one flash attention per layer; decode steps read the untransposed V with out_prod where the devices have it
SELF_EXTEND_FLASH_OPS = SELF_EXTEND_OPS | {"PAD", "FLASH_ATTN_EXT", "OUT_PROD"}
# on devices with it (the CPU, patch 0004): one flash attention per block of cells, each continuing the last
SELF_EXTEND_FLASH_LSE_OPS = SELF_EXTEND_OPS | {"FLASH_ATTN_EXT_LSE"}
# without flash attention, on devices with it (the CPU, patch 0008): the blocks of scores written side by side
SELF_EXTEND_MUL_MAT_CONCAT_OPS = SELF_EXTEND_OPS | {"MUL_MAT_CONCAT"}


def ggml_base():
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nelements.restype = lib.ggml_nrows.restype = ctypes.c_int64
    for function in (lib.ggml_op_desc, lib.ggml_get_name, lib.ggml_nelements, lib.ggml_nrows):
        function.argtypes = [ctypes.c_void_p]
    # where a node runs (the buffer type of its result), and what a device says of it
    lib.ggml_backend_buffer_get_type.restype = ctypes.c_void_p
    lib.ggml_backend_buffer_get_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_supports_op.restype = ctypes.c_bool
    lib.ggml_backend_dev_supports_op.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


def tensor_buffer(tensor):
    """ggml_tensor's buffer field: the struct starts with enum ggml_type, then the buffer pointer."""
    return ctypes.c_void_p.from_address(tensor + ctypes.sizeof(ctypes.c_void_p)).value


def tensor_shape(tensor):
    """ggml_tensor's ne[4], which follows the buffer pointer."""
    return tuple((ctypes.c_int64 * 4).from_address(tensor + 2 * ctypes.sizeof(ctypes.c_void_p)))


def layer_device():
    """The device that runs the layers of a model loaded with every layer offloaded: the first GPU
    (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU)), else the CPU. libggml holds the registry."""
    ggml = ctypes.CDLL(str(lib_dir() / "libggml.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    gpu, cpu = 1, 0  # enum ggml_backend_dev_type
    return ggml.ggml_backend_dev_by_type(gpu) or ggml.ggml_backend_dev_by_type(cpu)


def graph_ops(path, group_size, window, n_tokens, type_k=llama_cpp.GGML_TYPE_F16, flash_attn=False, widths=None,
              n_gpu_layers=None, nodes=None, shapes=None):
    """The ggml operation names of every node computed while evaluating n_tokens tokens.
    widths, a dict, gets the first dimensions of the nodes named "<name>-<layer>", by name;
    shapes, a dict, the shape (ne) of each node named "<name>-0" (layer 0) as computed, by name, in order.
    nodes, a dict, gets for each (operation, name without the layer) the buffer types its results were
    computed into (which device ran it: "CPU", "Vulkan0", ...) and whether layer_device()'s
    ggml_backend_dev_supports_op accepts the node ("supported")."""
    ggml = ggml_base()
    seen = set()
    device = layer_device() if nodes is not None else None

    @llama_cpp.ggml_backend_sched_eval_callback
    def record(tensor, ask, user_data):
        op = ggml.ggml_op_desc(tensor).decode()
        seen.add(op)
        name = re.match(r"(.*?)(-\d+)?$", ggml.ggml_get_name(tensor).decode())  # "<name>-<layer>"
        if widths is not None and name[2]:
            widths.setdefault(name[1], set()).add(ggml.ggml_nelements(tensor) // ggml.ggml_nrows(tensor))
        if shapes is not None and name[2] == "-0":
            shapes.setdefault(name[1], []).append(tensor_shape(tensor))
        if nodes is not None:
            node = nodes.setdefault((op, name[1]), {"buffers": set(), "supported": True})
            buffer = tensor_buffer(tensor)
            node["buffers"].add(ggml.ggml_backend_buft_name(ggml.ggml_backend_buffer_get_type(buffer)).decode()
                                if buffer else "none")
            node["supported"] &= bool(ggml.ggml_backend_dev_supports_op(device, tensor))
        return False  # nothing to copy out

    llm = Llama(str(path), n_ctx=n_tokens + 8, n_batch=64, n_ubatch=64, verbose=False, type_k=type_k,
                flash_attn=flash_attn, grp_attn_n=group_size, grp_attn_w=window,
                n_gpu_layers=n_gpu_layers_for_tests() if n_gpu_layers is None else n_gpu_layers)
    params = llm.context_params
    params.cb_eval = record
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    try:
        assert llm._lib.llama_set_self_extend(ctx, group_size, window or 0) == 0
        tokens = np.random.default_rng(0).integers(0, 320, size=n_tokens).tolist()
        for start in range(0, n_tokens, 64):  # prefill ubatches, then single-token decode steps
            chunk = (llama_cpp.llama_token * 64)(*tokens[start:start + 64])  # kept alive for the call
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(chunk, len(chunk))) == 0
        for token in tokens[:8]:
            one = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
    finally:
        llama_cpp.llama_free(ctx)
    return seen


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
def test_self_extend_adds_only_supported_ops(tiny_f32_gguf, type_k):
    type_k = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[type_k]
    vanilla = graph_ops(tiny_f32_gguf, 1, None, 192, type_k)
    extended = graph_ops(tiny_f32_gguf, 4, 16, 192, type_k)
    added = extended - vanilla
    assert added, "Self-Extend on produced the vanilla graph"
    assert added <= SELF_EXTEND_MUL_MAT_CONCAT_OPS, \
        f"ops outside the documented list: {sorted(added - SELF_EXTEND_MUL_MAT_CONCAT_OPS)}"
    assert "MUL_MAT_CONCAT" in added  # the blocks of scores, in place (the CPU has it)


def no_flash_graph(path) -> list:
    """The operations of a graph without flash attention, with Self-Extend (JSON for run_with_library)."""
    return sorted(graph_ops(path, 4, 16, 192))


def test_devices_without_mul_mat_concat_join_the_blocks_with_concat(tiny_f32_gguf):
    """A build that takes the paths of devices without ggml_mul_mat_concat (CUDA, Metal, Vulkan) joins
    the blocks of scores with CONCAT, which every backend has, and adds nothing else undocumented."""
    ops = set(run_with_library(main_lib_dir(), "test_backend_ops", "no_flash_graph", str(tiny_f32_gguf),
                               limited_device="fallbacks"))
    assert "CONCAT" in ops and "MUL_MAT_CONCAT" not in ops
    assert ops <= graph_ops(tiny_f32_gguf, 1, None, 192) | SELF_EXTEND_OPS


def test_without_flash_attention_several_tokens_attend_in_chunks_of_heads(tiny_f32_gguf):
    """Prefill ubatches without flash attention attend in chunks of whole KV-head groups (the tiny model's
    4 heads share 2 KV heads: 2 chunks of 2 heads), so that one chunk's score blocks and their join are
    alive at a time; a single-token step attends all heads at once."""
    shapes = {}
    graph_ops(tiny_f32_gguf, 4, 16, 192, shapes=shapes)
    softmax = shapes["kq_soft_max_self_extend"]  # [n_cells, n_tokens, n_heads, n_stream] per computation
    prefill = [s for s in softmax if s[1] > 1]
    decode = [s for s in softmax if s[1] == 1]
    assert len(prefill) == 2 * (192 // 64) and {s[2] for s in prefill} == {2}
    assert len(decode) == 8 and {s[2] for s in decode} == {4}


def test_self_extend_with_flash_attention_uses_one_flash_attention_per_block_on_the_cpu(tiny_f32_gguf):
    """Prefill ubatches and decode steps alike take ggml_flash_attn_ext_lse per block of cells (the CPU
    has it), each continuing the softmax of the one before; only documented operations."""
    vanilla = graph_ops(tiny_f32_gguf, 1, None, 192, flash_attn=True)
    extended = graph_ops(tiny_f32_gguf, 4, 16, 192, flash_attn=True)
    assert "FLASH_ATTN_EXT" in vanilla and "FLASH_ATTN_EXT_LSE" in extended
    assert "FLASH_ATTN_EXT" not in extended
    assert not {"PAD", "OUT_PROD"} & extended  # neither the doubled head size nor the non-flash decode
    assert extended <= vanilla | SELF_EXTEND_FLASH_LSE_OPS, \
        f"undocumented: {sorted(extended - vanilla - SELF_EXTEND_FLASH_LSE_OPS)}"


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no_flash", "flash"])
def test_every_node_is_supported_by_the_device_that_runs_it(tiny_f32_gguf, flash_attn):
    """The op audit on the live CPU device (tests/test_vulkan.py runs the same on Vulkan): its
    supports_op accepts every node of the real Self-Extend graph (prefill ubatches and decode steps),
    and every node is computed into a CPU buffer."""
    nodes = {}
    graph_ops(tiny_f32_gguf, 4, 16, 192, flash_attn=flash_attn, nodes=nodes)
    assert any("self_extend" in name for _, name in nodes), sorted(nodes)
    refused = sorted(key for key, node in nodes.items() if not node["supported"])
    assert not refused, f"the CPU device refuses {refused}"
    assert {b for node in nodes.values() for b in node["buffers"]} <= {"CPU", "none"}


def flash_graph(path) -> dict:
    """The operations of a flash-attention graph with Self-Extend, and the output widths of its flash
    attention nodes by name (JSON values: run_with_library runs it in a child bound to another build)."""
    widths = {}
    ops = graph_ops(path, 4, 16, 192, flash_attn=True, widths=widths)
    return {"ops": sorted(ops), "widths": {name: sorted(w) for name, w in widths.items() if "flash" in name}}


@pytest.fixture(scope="module")
def flash_graphs(tiny_f32_gguf):
    """The paths of devices without ggml_flash_attn_ext_lse, every layer on a device without it
    (native_build.LIMITED_DEVICES): "no_flash_lse", with out_prod and flash attention of two head sizes
    (as the CPU has them); "fallbacks", without those either."""
    return {paths: run_with_library(main_lib_dir(), "test_backend_ops", "flash_graph", str(tiny_f32_gguf),
                                    limited_device=paths)
            for paths in ("no_flash_lse", "fallbacks")}


@pytest.mark.parametrize("paths", ["no_flash_lse", "fallbacks"])
def test_without_flash_lse_the_blocks_share_one_flash_attention_of_the_doubled_head_size(tiny_f32_gguf, flash_graphs,
                                                                                         paths):
    """One flash attention over Q' = [Q_grp | Q] and K' (prefill); only operations every backend has. V
    keeps its head size where the device takes K and V of two head sizes (half the V work), else it is
    padded to the doubled size."""
    ops = set(flash_graphs[paths]["ops"])
    assert "FLASH_ATTN_EXT" in ops and "FLASH_ATTN_EXT_LSE" not in ops and "PAD" in ops
    # decode steps take the non-flash blocks, their scores in place where the device has it (the CPU)
    in_place = {"MUL_MAT_CONCAT"} if paths == "no_flash_lse" else set()
    assert in_place <= ops
    assert ops <= set(graph_ops(tiny_f32_gguf, 1, None, 192, flash_attn=True)) | SELF_EXTEND_FLASH_OPS | in_place
    llm = Llama(str(tiny_f32_gguf), n_ctx=64, verbose=False)
    n_embd_head = llama_cpp.llama_model_n_embd(llm.model) // llama_cpp.llama_model_n_head(llm.model)
    llm.close()
    assert flash_graphs[paths]["widths"]["kqv_self_extend_flash"] == \
        [n_embd_head if paths == "no_flash_lse" else 2 * n_embd_head]


@pytest.mark.parametrize("paths", ["no_flash_lse", "fallbacks"])
def test_without_flash_lse_decode_reads_v_with_out_prod_where_the_device_has_it(flash_graphs, paths):
    """Single-token steps on flash attention's untransposed V cache: out_prod sums over the cells without
    a transposed copy of V; devices without it (Metal) transpose V."""
    ops = set(flash_graphs[paths]["ops"])
    assert ("OUT_PROD" in ops) == (paths == "no_flash_lse")
    assert ("TRANSPOSE" in ops) == (paths == "fallbacks")
