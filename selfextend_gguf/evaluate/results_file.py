"""The results file of a sweep: one JSON object, read and written here for the harness (which
measures into it), the reports and compare.py (which read it).

    {"version": FORMAT_VERSION,
     "runs": [{"command", "model", "machine", "started"}, ...],   one per sweep that wrote to it
     "results": {cell key: the cell's result},
     "n_ctx_train": the model's trained context}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_VERSION = 1


def load_run(path: Path) -> dict:
    """The run in path; an empty one where there is no file yet. ValueError for a file that is not one."""
    if path.exists():
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a results JSON file ({error}); restore it from git or remove it "
                             "to measure again") from None
        if not isinstance(run, dict) or run.get("version") != FORMAT_VERSION:
            found = run.get("version") if isinstance(run, dict) else None
            raise ValueError(f"{path} has format version {found}, expected {FORMAT_VERSION}")
        return run
    return {"version": FORMAT_VERSION, "runs": [], "results": {}}


def save_run(path: Path, run: dict) -> None:
    """Write the run to path at once (a temporary file replaces it): a killed sweep leaves a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(run, indent=1, sort_keys=True))
    os.replace(tmp, path)


def merge(runs) -> dict:
    """One run dict holding the results (and run records) of several."""
    merged = {"version": FORMAT_VERSION, "runs": [], "results": {}}
    for run in runs:
        merged["runs"] += run["runs"]
        merged["results"].update(run["results"])
        merged.setdefault("n_ctx_train", run.get("n_ctx_train"))
    return merged
