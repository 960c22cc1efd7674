"""Matplotlib figures shared by the analysis command and the callbacks (Agg backend, no screen needed)."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def matrix_heatmap(matrix, rows: Sequence[str], cols: Sequence[str] | None = None, title: str = "",
                   vmin: float = -1.0, vmax: float = 1.0, cmap: str = "RdBu_r", fmt: str = "{:.2f}",
                   xlabel: str = "", ylabel: str = ""):
    """A labelled heat-map of an (n, m) matrix with its values written in the cells."""
    cols = list(cols if cols is not None else rows)
    values = [[float(v) for v in row] for row in matrix]
    side = max(4.0, 0.55 * max(len(rows), len(cols)) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if len(rows) * len(cols) <= 400:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v != v:  # NaN: a cell that was not measured stays blank
                    continue
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                        color="white" if abs(v - (vmin + vmax) / 2) > 0.6 * (vmax - vmin) / 2 else "black")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def block_heatmaps(blocks: dict, names: Sequence[str], title: str = ""):
    """Small multiples: one cosine heat-map per block (dict block -> (n, n) matrix)."""
    keys = list(blocks)
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        ax.axis("on")
        ax.imshow([[float(v) for v in r] for r in blocks[key]], vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(key, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks(range(len(names)), names if len(keys) <= 4 else [""] * len(names), fontsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves(x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = ""):
    """Line plot of several named series over x (values in percent)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(list(x), [100 * y if y is not None else float("nan") for y in ys], marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Write a PNG atomically (temp name then rename) and close the figure."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
