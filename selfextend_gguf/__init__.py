"""selfextend-gguf: exact Self-Extend (LongLM, arXiv 2401.01325) for GGUF models on llama.cpp."""
from .settings import SelfExtend, max_context, resolve

__all__ = ["Llama", "SelfExtend", "max_context", "resolve"]
__version__ = "0.1.0"


def __getattr__(name):
    # `Llama` loads the patched llama.cpp library: only when asked for
    if name == "Llama":
        from .llama import Llama
        return Llama
    raise AttributeError(f"module 'selfextend_gguf' has no attribute {name!r}")
