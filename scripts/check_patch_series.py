"""The patch series read as a reviewer reads it, and, with --build, built prefix by prefix.

For each patch in patches/ (in order) it prints `git apply --numstat`-style counts (lines added and
removed per file, and how many of them lie in llama.cpp's existing files), and it fails on:
  - a hunk, or a line of one, that changes only whitespace;
  - a patch that removes or rewrites a line that an earlier patch of the series added (the series
    should read as one concern per patch, none rewriting another); the one exception is ggml's op
    counters (COUNTERS), which every patch that adds an op bumps.
With --build it extracts the pinned sdist's llama.cpp (the hash-checked copy that the main build keeps
in build/py3-none-linux_x86_64/_deps, or --sdist), applies the patches one at a time and builds
libllama after each (and llama.cpp's programs after the patches that touch them, and at the end):
every prefix of the series must build. ggml-vulkan is not built (patch 0006 is the Vulkan check's).

    python scripts/check_patch_series.py                 # the counts and the two rules (seconds)
    python scripts/check_patch_series.py --build         # and every prefix builds (long: one build per patch)
    python scripts/check_patch_series.py --json out.json # the counts, for a note's before/after
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lines that every patch adding a ggml op must change, whoever added them last
COUNTERS = re.compile(r"GGML_OP_COUNT == \d+|GGML_OP_COUNT != \d+|RPC_PROTO_PATCH_VERSION")
SDIST = ROOT / "build" / "py3-none-linux_x86_64" / "_deps" / "llama_cpp_python-0.3.36.tar.gz"
BUILD_TARGETS = ["llama", "llama-server", "llama-cli", "llama-completion"]
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release",
               "-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]


def parse_patch(text: str) -> dict[str, list[tuple[list[str], list[str]]]]:
    """{file: [(removed lines, added lines) per hunk]}, for files that exist upstream and new ones alike."""
    files: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("+++ "):
            name = line[4:].split("\t")[0]
            current = files.setdefault(name[2:] if name.startswith("b/") else name, [])
        elif line.startswith("--- "):
            continue
        elif line.startswith("@@") and current is not None:
            current.append(([], []))
        elif current is not None and current and line[:1] in "+-":
            current[-1][0 if line[0] == "-" else 1].append(line[1:])
    return files


def is_new_file(text: str, name: str) -> bool:
    return re.search(rf"^--- /dev/null\n\+\+\+ b/{re.escape(name)}$", text, re.M) is not None


def squash(line: str) -> str:
    return "".join(line.split())


def whitespace_only(removed: list[str], added: list[str]) -> bool:
    return bool(removed) and "".join(map(squash, removed)) == "".join(map(squash, added))


def realigned(removed: list[str], added: list[str]) -> list[str]:
    """The removed lines of a hunk that come back with only their whitespace changed."""
    squashed = {squash(line) for line in added}
    return [line for line in removed if line not in added and squash(line) in squashed and re.search(r"\w", line)]


def audit(patches: list[Path]) -> tuple[list[dict], list[str]]:
    """Per patch: its counts; and the rule violations of the whole series."""
    added_by: dict[tuple[str, str], str] = {}  # (file, stripped line) -> the patch that added it
    rows, problems = [], []
    rewritten: dict[tuple[str, str, str], list[str]] = {}
    created: set[str] = set()
    for patch in patches:
        text = patch.read_text()
        row = dict(patch=patch.name, added=0, removed=0, upstream_added=0, upstream_removed=0, files={})
        for name, hunks in parse_patch(text).items():
            if is_new_file(text, name):
                created.add(name)
            new = name in created  # a file of the series, not of llama.cpp
            for removed, added in hunks:
                lines = realigned(removed, added)
                if whitespace_only(removed, added):
                    problems.append(f"{patch.name}: a hunk of {name} changes only whitespace")
                elif lines:
                    problems.append(f"{patch.name}: {len(lines)} lines of {name} change only their whitespace, "
                                    f"e.g. {lines[0].strip()[:60]}")
                for line in removed:
                    owner = added_by.get((name, line.strip()))
                    if owner and owner != patch.name and re.search(r"\w", line) and not COUNTERS.search(line):
                        rewritten.setdefault((patch.name, owner, name), []).append(line.strip())
                for line in added:
                    added_by.setdefault((name, line.strip()), patch.name)
                n_added, n_removed = len(added), len(removed)
                row["added"] += n_added
                row["removed"] += n_removed
                if not new:
                    row["upstream_added"] += n_added
                    row["upstream_removed"] += n_removed
                counts = row["files"].setdefault(name, [0, 0])
                counts[0] += n_added
                counts[1] += n_removed
        rows.append(row)
    for (patch, owner, name), lines in rewritten.items():
        problems.append(f"{patch} rewrites {len(lines)} lines that {owner} added to {name}, e.g. {lines[0][:70]}")
    return rows, problems


def build_prefixes(patches: list[Path], sdist: Path, work: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(work, members=members, filter="data")
    tree = next(work.glob("*/vendor/llama.cpp"))
    build = work / "build"
    env = dict(os.environ, CCACHE_BASEDIR=str(work))
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    for i, patch in enumerate(patches):
        subprocess.run(["patch", "-p1", "--fuzz=0", "--quiet", "--no-backup-if-mismatch", "-i", str(patch)], cwd=tree,
                       check=True)
        # libllama after every patch; the programs after those that touch them, and at the end
        touches_programs = any(name.startswith(("tools/", "common/")) for name in parse_patch(patch.read_text()))
        targets = BUILD_TARGETS if touches_programs or i == len(patches) - 1 else BUILD_TARGETS[:1]
        done = subprocess.run(["cmake", "--build", str(build), "--target", *targets], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the series up to {patch.name} does not build:\n{(done.stdout + done.stderr)[-4000:]}")
        print(f"builds: up to {patch.name} ({', '.join(targets)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="also build every prefix of the series")
    parser.add_argument("--sdist", type=Path, default=SDIST, help=f"llama-cpp-python's sdist (default: {SDIST})")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    parser.add_argument("--patches", type=Path, default=ROOT / "patches", help="the series' folder (default: patches/)")
    args = parser.parse_args()

    patches = sorted(args.patches.glob("*.patch"))
    rows, problems = audit(patches)
    print(f"{'patch':55} {'+':>6} {'-':>6} {'+ upstream':>11} {'- upstream':>11}")
    for row in rows:
        print(f"{row['patch']:55} {row['added']:6} {row['removed']:6} {row['upstream_added']:11} {row['upstream_removed']:11}")
    total = {k: sum(r[k] for r in rows) for k in ("added", "removed", "upstream_added", "upstream_removed")}
    print(f"{'total':55} {total['added']:6} {total['removed']:6} {total['upstream_added']:11} {total['upstream_removed']:11}")
    if args.json:
        args.json.write_text(json.dumps(dict(patches=rows, total=total), indent=1))
    for problem in problems:
        print("rule:", problem)

    if args.build:
        if not args.sdist.exists():
            sys.exit(f"{args.sdist} is missing: build the package once (pip install .), or pass --sdist")
        with tempfile.TemporaryDirectory(prefix="patch-series-") as work:
            build_prefixes(patches, args.sdist, Path(work))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
