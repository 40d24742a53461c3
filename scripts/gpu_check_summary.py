#!/usr/bin/env python3
"""The last step of scripts/gpu_check.sh: OUTDIR/gpu_check.json and OUTDIR/gpu_check.md from what
the run left in OUTDIR (steps.tsv, parity.xml, bench_16k.json, bench_32k.json), whatever stopped it.
Standard library only. Usage: gpu_check_summary.py OUTDIR SECONDS"""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def gpu() -> dict:
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        name, driver = (part.strip() for part in line.split(","))
        return {"name": name, "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"name": None, "driver": None}


def steps(out: Path) -> list:
    rows = []
    if (out / "steps.tsv").exists():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, status, seconds = line.split("\t")
            rows.append({"step": name, "status": status, "seconds": int(seconds)})
    return rows


def parity(out: Path) -> dict:
    """Each test case's outcome, from pytest's JUnit XML."""
    path = out / "parity.xml"
    if not path.exists():
        return {"ran": False, "cases": []}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"ran": True, **counts, "cases": cases}


def bench(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())["results"]
    for config, r in results.items():
        base = results["off, flash attn" if "flash" in config else "off"]
        r["prefill_vs_off"] = r["prefill_tps"] / base["prefill_tps"]
        r["decode_vs_off"] = r["decode_tps"] / base["decode_tps"]
    return results


def markdown(summary: dict) -> str:
    g = summary["gpu"]
    lines = [f"# Self-Extend GPU check: {g['name']} (driver {g['driver']}), {summary['seconds']} s", "",
             "| step | exit status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in summary["steps"]]
    p = summary["parity"]
    lines += ["", "## Parity, every layer on the GPU", ""]
    if p["ran"]:
        lines.append(f"{p['passed']} passed, {p['failed']} failed, {p['error']} errors, {p['skipped']} skipped")
        lines += [f"- {c['outcome']}: `{c['test']}`" for c in p["cases"] if c["outcome"] != "passed"]
    else:
        lines.append("did not run")
    for name in ("bench_16k", "bench_32k"):
        results = summary[name]
        lines += ["", f"## Speed, {name[6:]}", ""]
        if results is None:
            lines.append("did not run")
            continue
        lines += ["| configuration | prefill tok/s | decode tok/s | prefill vs off | decode vs off | compute MiB |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {r['prefill_vs_off']:.2f}x | "
                  f"{r['decode_vs_off']:.2f}x | {r['compute_mib']} |" for c, r in results.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: gpu_check_summary.py OUTDIR SECONDS")
    out = Path(sys.argv[1])
    summary = {"gpu": gpu(), "seconds": int(sys.argv[2]), "steps": steps(out), "parity": parity(out),
               "bench_16k": bench(out, "bench_16k"), "bench_32k": bench(out, "bench_32k")}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
