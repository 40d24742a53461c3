"""llama.cpp's own llama-server tests (tools/server/tests in the pinned sdist), run against this
project's llama-server with Self-Extend on (SmolLM2, --grp-attn-n 4 --grp-attn-w 8): the tests that
compare two answers of one server to one input. They pass with Self-Extend off; with it on they
failed before exact rewinds (patch 0009): the second request reuses the cached prompt, whose grouped
cells used to be rotated back with one more rounding of their K.

The upstream files are taken from the sdist unchanged; only their model preset is replaced by a
conftest (SmolLM2 from its package instead of a download, Self-Extend on), and their `wget` import,
a downloader these offline tests never call, is satisfied by an empty module."""
import os
import subprocess
import sys
import tarfile
import textwrap

from native_build import ROOT, local_sdist
from selfextend_gguf._native import program_path

UPSTREAM_TESTS = [
    "unit/test_completion.py::test_completion_stream_vs_non_stream",
    "unit/test_completion.py::test_completion_with_tokens_input",
    "unit/test_completion.py::test_n_probs_post_backend_sampling",
]

CONFTEST = textwrap.dedent("""
    import os, sys, types
    import pytest
    sys.modules.setdefault("wget", types.ModuleType("wget"))  # utils.py imports it to download models
    from utils import ServerPreset, ServerProcess, server_instances

    MODEL = os.environ["SELFEXTEND_UPSTREAM_MODEL"]

    def tinyllama2() -> ServerProcess:  # the preset of test_completion.py, on SmolLM2 with Self-Extend
        server = ServerProcess()
        server.model_hf_repo = None
        server.model_hf_file = None
        server.model_file = MODEL
        server.model_alias = "tinyllama-2"
        server.n_ctx = 512
        server.n_batch = 32
        server.n_slots = 2
        server.n_predict = 64
        server.seed = 42
        server.n_ga = 4
        server.n_ga_w = 8
        return server

    ServerPreset.tinyllama2 = staticmethod(tinyllama2)

    @pytest.fixture(autouse=True)
    def stop_server_after_each_test():
        yield
        for server in set(server_instances):
            server.stop()
""")


def sdist_tests(tmp_path):
    """tools/server/tests/{utils.py, unit/test_completion.py} of the pinned sdist, into tmp_path."""
    tree = next(iter(sorted(ROOT.glob("build/*/llama.cpp-src/tools/server/tests"))), None)
    if tree is not None:
        (tmp_path / "unit").mkdir()
        for name in ("utils.py", "unit/test_completion.py"):
            (tmp_path / name).write_text((tree / name).read_text())
        return tmp_path
    sdist = local_sdist()
    assert sdist is not None, "no llama.cpp source: build the project first (pip install .)"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            for name in ("utils.py", "unit/test_completion.py"):
                if member.name.endswith("vendor/llama.cpp/tools/server/tests/" + name):
                    (tmp_path / name).parent.mkdir(exist_ok=True)
                    (tmp_path / name).write_bytes(tar.extractfile(member).read())
    return tmp_path


def test_upstream_server_tests_pass_with_self_extend(tmp_path, smollm2_path):
    folder = sdist_tests(tmp_path)
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, LLAMA_SERVER_BIN_PATH=str(program_path("llama-server")),
               SELFEXTEND_UPSTREAM_MODEL=str(smollm2_path), PORT="18391")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *UPSTREAM_TESTS],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "3 passed" in done.stdout, done.stdout[-2000:]
