"""pyproject.toml's runtime dependencies are what the runtime imports, and the long-context
evaluation works without its `eval` extra (matplotlib) until a plot is drawn, then says what to install.

The runtime is the package without its evaluation, torch reference and test helpers: the CLI's
chat, run, info and serve, the Llama API and the document readers."""
import ast
import collections
import functools
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from selfextend_gguf import models

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selfextend_gguf"
NOT_RUNTIME = ("evaluate", "reference", "testing")   # the `eval` and `reference` extras', the tests'
# the runtime finds these by name without importing them: the default model's file is inside its package
LOCATED_NOT_IMPORTED = {models.SMOLLM2_PACKAGE}


def runtime_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def distribution_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement)[0]


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


@functools.cache
def installed_modules() -> dict[str, set[str]]:
    """{distribution: the top-level modules it installed} ("python-docx": {"docx"})."""
    provided = collections.defaultdict(set)
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            provided[normalized(distribution)].add(module)
    return provided


def modules_of(distribution: str) -> set[str]:
    return installed_modules().get(normalized(distribution), set())


def runtime_imports() -> set[str]:
    """The top-level names of every absolute import in the runtime's modules, function-local ones too."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in NOT_RUNTIME:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_each_runtime_dependency_is_imported_by_the_runtime():
    used = runtime_imports() | LOCATED_NOT_IMPORTED
    unused = {}
    for requirement in runtime_requirements():
        modules = modules_of(distribution_name(requirement))
        assert modules, f"{requirement} is not installed: cannot tell which modules it provides"
        if not modules & used:
            unused[requirement] = sorted(modules)
    assert not unused, f"runtime dependencies that no runtime module imports (an extra's, or none's): {unused}"


def test_runtime_dependencies_pull_in_no_extras():
    # an extra (llama-cpp-python[server]) installs packages that the runtime never imports
    assert [r for r in runtime_requirements() if "[" in r] == []


def test_the_runtime_imports_only_its_dependencies():
    provided = set().union(*(modules_of(distribution_name(r)) for r in runtime_requirements()))
    third_party = runtime_imports() - set(sys.stdlib_module_names) - {"selfextend_gguf"}
    assert third_party - provided == set(), "imported by the runtime but not in pyproject's dependencies"


def test_the_evaluation_without_matplotlib_reports_and_says_what_to_install(tmp_path):
    cell = {"task": "passkey", "method": "exact-auto", "length": 16384, "depth": 0.5, "seed": 0, "correct": True}
    out = tmp_path / "run.json"
    out.write_text(json.dumps({"version": 1, "runs": [], "results": {"passkey|exact-auto|16384|0.50|0|fa": cell},
                               "n_ctx_train": 8192}))
    argv = ["--report-only", "--out", str(out), "--plots", str(tmp_path / "plots")]
    child = ("import sys\n"
             "sys.modules['matplotlib'] = None  # as where it is not installed: importing it raises ImportError\n"
             "from selfextend_gguf.evaluate import command, compare, harness, names, plots, prompts, results_file\n"
             f"sys.exit(command.main({argv!r}))\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ('no plots: the evaluation\'s plots need matplotlib: '
                                   'pip install "selfextend-gguf[eval]"')
    assert "| exact-auto |" in out.with_suffix(".md").read_text()  # the report is written all the same
