"""The patch's C functions as _native.py binds them: their named return codes, and the capture of
llama.cpp's logs that the CLI uses to explain a failure."""
import ctypes

from selfextend_gguf import Llama, _native
from selfextend_gguf.settings import SelfExtend, max_context


def test_return_codes_getters_and_captured_errors(tiny_f32_gguf):
    llm = Llama(str(tiny_f32_gguf), n_ctx=64, n_threads=1, verbose=False)
    ctx = llm._ctx.ctx
    logs = _native.LlamaLogCapture()
    logs.install()
    try:
        assert _native.llama_set_self_extend(ctx, 0, 8) == _native.LLAMA_SELF_EXTEND_ERR_INVALID
        assert "invalid group_size = 0" in logs.last_error
        assert _native.llama_set_self_extend_exact_rewind(ctx, -2) == _native.LLAMA_SELF_EXTEND_ERR_INVALID
        assert "invalid n_tokens = -2" in logs.last_error
        assert _native.llama_set_self_extend(ctx, 4, 8) == _native.LLAMA_SELF_EXTEND_OK
        assert _native.llama_set_self_extend_exact_rewind(ctx, 16) == _native.LLAMA_SELF_EXTEND_OK
        assert (_native.llama_get_self_extend_group_size(ctx), _native.llama_get_self_extend_neighbor_window(ctx),
                _native.llama_get_self_extend_exact_rewind(ctx)) == (4, 8, 16)
        assert _native.llama_get_self_extend_n_ctx_max(ctx) == max_context(64, SelfExtend(4, 8))
    finally:
        llama_cpp = _native.load_llama_cpp()  # give llama.cpp's logs back to llama-cpp-python's logger
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
        llm.close()
