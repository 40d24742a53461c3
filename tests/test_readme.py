"""The README says what is true now: it is short, every command it shows exists and takes the flags shown,
and every figure of its results names the file it comes from, which holds that figure."""
import re
import shlex
import subprocess
from pathlib import Path

from selfextend_gguf.cli import build_parser
from selfextend_gguf.programs import program_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[str]:
    """Every command of the README's bash blocks and of its results table, && chains split, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        found += [line.split("  #")[0].strip() for line in block.splitlines()]
    found += re.findall(r"\| `((?:python|bash) [^`]+)` \|", README)
    return [part.strip() for command in found for part in command.split("&&") if part.strip()]


def words_of(command: str) -> list[str]:
    words = shlex.split(command)
    while words and "=" in words[0]:  # leading VAR=value assignments
        words.pop(0)
    return words


def results_rows() -> list[list[str]]:
    section = README.split("## Results on the current code", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| what")]
    return rows


def test_the_readme_is_short():
    assert len(README.encode()) < 12_000, len(README.encode())


def test_the_selfextend_gguf_commands_parse():
    shown = [c for c in commands() if c.startswith("selfextend-gguf ")]
    assert len(shown) >= 5
    for command in shown:
        build_parser().parse_args(words_of(command)[1:])  # an unknown flag or command exits here


def test_the_scripts_exist_and_take_the_flags_shown():
    shown = [words_of(c) for c in commands() if words_of(c)[0] in ("python", "bash")]
    assert len(shown) >= 8
    for words in shown:
        if words[:2] == ["python", "-m"]:  # python -m pytest <test files>
            assert all((ROOT / w).exists() for w in words[3:] if w.startswith("tests/")), words
            continue
        script = ROOT / words[1]
        assert script.is_file(), words
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag in script.read_text(), f"{script.name} has no {flag}"


def test_llama_programs_take_the_flags_shown():
    shown = [words_of(c) for c in commands() if c.startswith(("llama-server ", "llama-completion "))]
    assert len(shown) >= 2
    for words in shown:
        done = subprocess.run([str(program_path(words[0])), "--help"], capture_output=True, text=True, timeout=60)
        for flag in (w for w in words[1:] if w.startswith("-")):
            assert re.search(rf"(^|[ ,]){re.escape(flag)}([ ,=]|$)", done.stdout + done.stderr, re.M), \
                f"{words[0]} --help does not list {flag}"


def test_every_result_names_a_file_that_holds_its_figures():
    rows = results_rows()
    assert len(rows) >= 6
    for what, figure, _command, source in rows:
        path = ROOT / source.strip("`")
        assert path.is_file(), f"{what}: {source} does not exist"
        if path.suffix == ".txt":
            text = path.read_text()
            for number in re.findall(r"\d+\.\d+(?:e-?\d+)?", figure):
                assert number in text, f"{what}: {number} is not in {source}"
