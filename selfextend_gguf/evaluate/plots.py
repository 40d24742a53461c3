"""PNG plots of a run: accuracy heatmaps (depth x length, one panel per method), accuracy
against G and W, perplexity against length, throughput against filled context. matplotlib,
headless (Agg), imported only when a plot is drawn: it is the `eval` extra's, not the runtime's."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import compare
from .harness import _grouped, _k


INSTALL_HINT = 'pip install "selfextend-gguf[eval]"'


class MatplotlibMissing(ImportError):
    """A plot was asked for where matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissing(f"the evaluation's plots need matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def retrieval_heatmaps(results, task, path: Path) -> Path | None:
    rows, method_names, lengths = _grouped(results, task)
    if not rows:
        return None
    plt = _pyplot()
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(method_names), figsize=(1.2 + 0.9 * len(lengths) * len(method_names), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], method_names):
        hits = defaultdict(list)
        for r in rows:
            if r["method"] == name:
                hits[(r["depth"], r["length"])].append(r["correct"])
        grid = [[(sum(hits[(d, n)]) / len(hits[(d, n)])) if hits[(d, n)] else float("nan") for n in lengths]
                for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if ax is axes[0][0] else [])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("prompt tokens")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    fig.suptitle(f"{task} retrieval")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gw_curves(results, n_ctx_train, path: Path, task="passkey") -> Path | None:
    """Accuracy against G (at the automatic W) and against W (at the automatic G), on the cells
    every setting measured, one panel each, per length with a G/W sweep; the automatic setting
    is marked."""
    sweeps = {}
    for n in sorted({r["length"] for r in results.values() if r["task"] == task}):
        s = compare.sensitivity(results, n, n_ctx_train, task)
        if len(s["settings"]) >= 2 and s["cells"] and s["auto"] in s["settings"]:
            sweeps[n] = s
    if not sweeps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (n, s) in enumerate(sweeps.items()):
        auto_g, auto_w = s["auto"]
        accuracy = {gw: sum(h.values()) / len(h) for gw, h in s["settings"].items()}
        for ax, index, fixed, label in ((axes[0], 0, auto_w, "group size G"), (axes[1], 1, auto_g, "neighbor window W")):
            other = 1 - index
            points = sorted((gw[index], a) for gw, a in accuracy.items() if gw[other] == fixed)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}",
                    label=f"{_k(n)}, {'W' if index == 0 else 'G'}={fixed} ({len(s['cells'])} cells)")
            ax.plot([s["auto"][index]], [accuracy[s["auto"]]], marker="*", markersize=14, color=f"C{i}",
                    linestyle="none")
            for gw in s["errors"]:
                if gw[other] == fixed:
                    ax.axvline(gw[index], color=f"C{i}", linestyle=":", alpha=0.6)
            ax.set_xlabel(label + (" (log scale)" if index == 1 else ""))
            if index == 1:
                ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{task} exact-match accuracy")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("exact Self-Extend: accuracy against G and W (star: the automatic setting; "
                 "dotted: cannot reach the length)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perplexity_curves(results, path: Path) -> Path | None:
    rows, method_names, lengths = _grouped(results, "perplexity")
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in method_names:
        points = sorted((r["length"], r["ppl"]) for r in rows if r["method"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [_k(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"perplexity of the last {rows[0]['n_last']} tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_curves(results, path: Path) -> Path | None:
    """Prefill and decode tokens/s against filled context, one line per method and kernel (the
    longest context measured for each)."""
    rows, method_names, _ = _grouped(results, "throughput")
    rows = [r for r in rows if r.get("curve")]
    if not rows:
        return None
    plt = _pyplot()
    longest = {(r["method"], r["flash_attn"]): r for r in sorted(rows, key=lambda r: r["length"])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "depth", "prefill_tps", "prefill tokens/s (per batch)"),
              (axes[1], "decode_depth", "decode_tps", "decode tokens/s"))
    for ax, x_field, y_field, label in panels:
        for i, name in enumerate(method_names):
            for fa, style in ((True, "-"), (False, "--")):
                r = longest.get((name, fa))
                if r:
                    ax.plot([p[x_field] / 1024 for p in r["curve"]], [p[y_field] for p in r["curve"]], style,
                            marker="o", color=f"C{i}", label=f"{name} ({'FA' if fa else 'no FA'})")
        ax.set_xlabel("filled context (thousands of tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(run: dict, folder: Path, prefix: str = "results") -> list:
    """Every plot the run has data for; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    results = run["results"]
    made = [retrieval_heatmaps(results, "passkey", folder / f"{prefix}_passkey.png"),
            retrieval_heatmaps(results, "needle", folder / f"{prefix}_needle.png"),
            gw_curves(results, run.get("n_ctx_train"), folder / f"{prefix}_gw.png") if run.get("n_ctx_train") else None,
            perplexity_curves(results, folder / f"{prefix}_perplexity.png"),
            throughput_curves(results, folder / f"{prefix}_throughput.png")]
    return [p for p in made if p is not None]
