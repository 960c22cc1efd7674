"""What people read of a run: summary.md (the attack × method matrix, then CA / ASR per attack × merge × λ and
IBVS before → after), the matrix heat-maps (ASR, ΔCA) and the ASR / CA against λ figure, as PNGs and in
TensorBoard, and matrix.csv, the cells behind them. Pure functions of the rows; nothing here trains or evaluates.

A matrix cell is one (attack, merge method, defense) triple: the attack's scenario merged with the method
(Task Arithmetic at the headline λ, every other method at its own rule's coefficient), undefended or under a
defense at its selected strength. ΔCA = its mean clean accuracy − that of the all-clean merge of the same
method (and λ), undefended. ASR, robust accuracy and clean-to-target are the attack's own trigger's, with
their hit / total counts. The all-clean merge is the row ``none`` (ΔCA 0 by definition, no ASR).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

MATRIX_FIELDS = ("attack", "method", "coefficient", "defense", "defense_alpha", "mean_clean_acc", "delta_ca", "asr",
                 "asr_hits", "asr_total", "ra", "ra_hits", "ra_total", "clean_to_target", "clean_to_target_hits",
                 "clean_to_target_total")


def _is_trigger(r: dict, label: str | None = None) -> bool:
    """A row of a measured trigger (``attack`` is its reference; clean-accuracy rows have none)."""
    return isinstance(r.get("attack"), dict) and (label is None or r["attack"]["label"] == label)


def _is_clean(r: dict) -> bool:
    return not isinstance(r.get("attack"), dict)


def _write_whole(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _cell_method(r: dict, headline: float) -> str | None:
    """The matrix column of a row: its merge name (TA only at the headline λ); None for rows outside the matrix."""
    if r["merge"] in ("individual", "zero-shot"):
        return None
    if r["merge"] == "task_arithmetic":
        return "task_arithmetic" if r["coefficient"] is not None and math.isclose(r["coefficient"], headline) else None
    return r["merge"]


def matrix_cells(rows: list[dict], headline: float) -> list[dict]:
    """The attack × method × defense cells (see the module docstring), in row order: all-clean first."""
    def defense_of(r):
        return r.get("defense", "none") or "none"

    kept = [r for r in rows if _cell_method(r, headline) is not None
            and (defense_of(r) == "none" or r.get("defense_selected"))]
    reference = {_cell_method(r, headline): r for r in kept
                 if r["scenario"] == "clean" and _is_clean(r) and defense_of(r) == "none"}
    cells = []
    for r in kept:
        if not _is_clean(r):
            continue
        method = _cell_method(r, headline)
        attack = "none" if r["scenario"] == "clean" else r["scenario"]
        if attack == "none" and defense_of(r) != "none":
            continue
        ref = reference.get(method)
        cell = {"attack": attack, "method": method, "coefficient": r["coefficient"], "defense": defense_of(r),
                "defense_alpha": r.get("defense_alpha"), "mean_clean_acc": r["mean_clean_acc"],
                "delta_ca": None if ref is None else r["mean_clean_acc"] - ref["mean_clean_acc"]}
        trigger = next((x for x in kept if x["scenario"] == r["scenario"] and _is_trigger(x) and x["attack"].get("in_merge")
                        and x["merge"] == r["merge"] and x["coefficient"] == r["coefficient"]
                        and defense_of(x) == defense_of(r) and x.get("defense_alpha") == r.get("defense_alpha")), None)
        for key in ("asr", "ra", "clean_to_target"):
            cell[key] = None if trigger is None else trigger[key]
            for part in ("hits", "total"):
                cell[f"{key}_{part}"] = None if trigger is None else trigger.get(f"{key}_{part}")
        cells.append(cell)
    return cells


def _grid(cells: list[dict], defense: str, key: str) -> tuple[list[str], list[str], list[list[float]]]:
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    if defense != "none":
        attacks = [a for a in attacks if a != "none"]
    value = {(c["attack"], c["method"]): c[key] for c in cells if c["defense"] == defense}
    grid = [[float("nan") if value.get((a, m)) is None else 100 * value[(a, m)] for m in methods] for a in attacks]
    return attacks, methods, grid


def matrix_tables(cells: list[dict]) -> str:
    """Markdown: per defense one table, rows attacks, columns methods, cells ``ASR / ΔCA`` (percent, points)."""
    out = []
    for defense in dict.fromkeys(c["defense"] for c in cells):
        attacks, methods, _ = _grid(cells, defense, "asr")
        at = {(c["attack"], c["method"]): c for c in cells if c["defense"] == defense}
        title = ("undefended" if defense == "none"
                 else f"under {defense} at its selected strength (chosen on clean val data only)")
        out += [f"Attack × method, {title}: ASR % / ΔCA (points vs the all-clean merge of the same method)", "",
                "| attack | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for a in attacks:
            cellv = []
            for m in methods:
                c = at.get((a, m))
                if c is None:
                    cellv.append("")
                    continue
                asr = "–" if c["asr"] is None else f"{100 * c['asr']:.1f}"
                dca = "" if c["delta_ca"] is None else f" / {100 * c['delta_ca']:+.1f}"
                cellv.append(asr + dca)
            out.append(f"| {a} | " + " | ".join(cellv) + " |")
        out.append("")
    return "\n".join(out)


def write_matrix(out_dir: Path, rows: list[dict], headline: float) -> list[dict]:
    """matrix.csv (the cells, with counts) and the heat-maps asr_matrix.png / delta_ca_matrix.png, also in TensorBoard."""
    cells = matrix_cells(rows, headline)
    if not cells:
        return cells

    def write_csv(tmp: Path) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MATRIX_FIELDS)
        w.writeheader()
        w.writerows(cells)
        tmp.write_text(buf.getvalue())

    _write_whole(out_dir / "matrix.csv", write_csv)
    from torch.utils.tensorboard import SummaryWriter

    from evaluation.figures import matrix_heatmap, plt

    writer = SummaryWriter(str(out_dir / "tensorboard"), filename_suffix=".matrix")
    for key, name, vmin, vmax, cmap, fmt in (("asr", "asr_matrix", 0.0, 100.0, "Reds", "{:.0f}"),
                                             ("delta_ca", "delta_ca_matrix", -10.0, 10.0, "RdBu", "{:+.1f}")):
        defenses = list(dict.fromkeys(c["defense"] for c in cells))
        figs = []
        for defense in defenses:
            attacks, methods, grid = _grid(cells, defense, key)
            label = "undefended" if defense == "none" else f"{defense} (selected strength)"
            what = "ASR (%)" if key == "asr" else "ΔCA (points vs all-clean merge)"
            fig = matrix_heatmap(grid, attacks, methods, title=f"{what}, {label}", vmin=vmin, vmax=vmax, cmap=cmap,
                                 fmt=fmt, xlabel="merge method", ylabel="attack")
            writer.add_figure(f"matrix/{key}/{defense}", fig, 0)
            figs.append(fig)
        # one PNG per quantity: the undefended matrix (the others are in TensorBoard and matrix.csv)
        _write_whole(out_dir / f"{name}.png", lambda tmp, f=figs[0]: f.savefig(tmp, dpi=110))
        if len(figs) > 1:
            _write_whole(out_dir / f"{name}_defended.png", lambda tmp, f=figs[1]: f.savefig(tmp, dpi=110))
        for f in figs:
            plt.close(f)
    writer.close()
    return cells


def write_summary(out_dir: Path, rows: list[dict], tasks: list[str], coefficients: list[float],
                  headline: float | None = None) -> str:
    """summary.md: per attack and merge, mean CA (vs the all-clean merge), ASR, clean→target, the same trigger on
    θ_pre and on the all-clean merge, and the inherent (stage-1) trigger on this merge; then IBVS before/after."""
    plain = [r for r in rows if r.get("defense", "none") == "none"]
    clean = {r["coefficient"]: r for r in plain if r["scenario"] == "clean" and r["merge"] == "task_arithmetic"
             and _is_clean(r)}
    lines = []
    if headline is not None:
        lines += [matrix_tables(matrix_cells(rows, headline)), "Per attack, merge and λ:", ""]
    lines += ["| attack | merge | λ | mean CA | all-clean CA | ΔCA | ASR | clean→target | ASR on θ_pre | "
             "ASR on all-clean merge | inherent trigger ASR |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    def same_merge(x, r):
        return x["merge"] == r["merge"] and x["coefficient"] == r["coefficient"]

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows if r["scenario"] != "clean"))
    for scenario in scenarios:
        for r in plain:
            if r["scenario"] != scenario or not _is_trigger(r) or not r["attack"].get("in_merge"):
                continue
            label = r["attack"]["label"]
            ref = (clean.get(r["coefficient"]) if r["merge"] == "task_arithmetic"
                   else next((x for x in plain if x["scenario"] == "clean" and x["merge"] == r["merge"] and _is_clean(x)), None))
            probe_pre = next((x for x in plain if x["scenario"] == "clean" and x["merge"] == "zero-shot" and _is_trigger(x, label)), None)
            probe_clean = next((x for x in plain if x["scenario"] == "clean" and same_merge(x, r) and _is_trigger(x, label)), None)
            inherent = next((x for x in plain if x["scenario"] == scenario and same_merge(x, r) and _is_trigger(x)
                             and x["attack"].get("name") == "inherent"
                             and x["attack"].get("target_task") == r["attack"].get("target_task")), None)
            delta = None if ref is None else r["mean_clean_acc"] - ref["mean_clean_acc"]
            coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
            lines.append(f"| {scenario} | {r['merge']} | {coef} | {pct(r['mean_clean_acc'])} | "
                         f"{pct(ref['mean_clean_acc']) if ref else ''} | {'' if delta is None else f'{100 * delta:+.1f}'} | "
                         f"{pct(r['asr'])} | {pct(r['clean_to_target'])} | "
                         f"{pct(probe_pre['asr']) if probe_pre else ''} | {pct(probe_clean['asr']) if probe_clean else ''} | "
                         f"{pct(inherent['asr']) if inherent else ''} |")
    selected = [r for r in rows if r.get("defense") == "ibvs" and r.get("defense_selected") and _is_trigger(r)
                and r["attack"].get("in_merge")]
    if selected:
        lines += ["", "IBVS (the defender's own pair; α chosen on clean val data only): ASR and mean CA before → after",
                  "", "| attack | merge | λ | α | ASR before | ASR after | clean→target after | mean CA before | mean CA after | ΔCA |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in selected:
            before = next((x for x in plain if x["scenario"] == r["scenario"] and same_merge(x, r)
                           and _is_trigger(x, r["attack"]["label"])), None)
            if before is None:
                continue
            coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
            lines.append(f"| {r['scenario']} | {r['merge']} | {coef} | {r['defense_alpha']:g} | {pct(before['asr'])} | "
                         f"{pct(r['asr'])} | {pct(r['clean_to_target'])} | {pct(before['mean_clean_acc'])} | "
                         f"{pct(r['mean_clean_acc'])} | {100 * (r['mean_clean_acc'] - before['mean_clean_acc']):+.1f} |")
    text = "\n".join(lines) + "\n"
    tmp = out_dir / f".summary.md.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out_dir / "summary.md")
    return text


def plot_and_log(out_dir: Path, rows: list[dict], coefficients: list[float]) -> Path | None:
    """ASR and mean CA of every attack's TA merge against λ: a PNG and TensorBoard scalars + figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    series = {}
    for r in rows:
        if (r["merge"] == "task_arithmetic" and _is_trigger(r) and r["attack"].get("in_merge")
                and r.get("defense", "none") == "none"):
            series.setdefault(r["attack"]["label"], []).append((r["coefficient"], r["asr"], r["mean_clean_acc"]))
    clean = sorted((r["coefficient"], r["mean_clean_acc"]) for r in rows if r["scenario"] == "clean"
                   and r["merge"] == "task_arithmetic" and _is_clean(r) and r.get("defense", "none") == "none")
    if not series:
        return None
    fig, (ax_asr, ax_ca) = plt.subplots(1, 2, figsize=(10, 4))
    for old in (out_dir / "tensorboard").glob("events.out.tfevents.*"):
        old.unlink()  # a rerun replaces the curves instead of adding a second point at every step
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for label, pts in series.items():
        pts.sort()
        ax_asr.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
        ax_ca.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", label=label)
        for c, asr, ca in pts:
            writer.add_scalar(f"merge/task_arithmetic/{label}/asr", asr, round(100 * c))
            writer.add_scalar(f"merge/task_arithmetic/{label}/mean_acc", ca, round(100 * c))
    for r in rows:  # IBVS at its selected α: the defended ASR / CA beside the undefended curves
        if (r["merge"] == "task_arithmetic" and r.get("defense") == "ibvs" and r.get("defense_selected")
                and _is_trigger(r) and r["attack"].get("in_merge")):
            step = round(100 * r["coefficient"])
            writer.add_scalar(f"merge/task_arithmetic/{r['attack']['label']}/asr_ibvs", r["asr"], step)
            writer.add_scalar(f"merge/task_arithmetic/{r['attack']['label']}/mean_acc_ibvs", r["mean_clean_acc"], step)
    if clean:
        ax_ca.plot([c for c, _ in clean], [100 * a for _, a in clean], "k--", label="all clean")
        for c, a in clean:
            writer.add_scalar("merge/task_arithmetic/clean/mean_acc", a, round(100 * c))
    ax_asr.set(xlabel="TA coefficient λ", ylabel="ASR (%)", ylim=(0, 100), title="Attack success rate")
    ax_ca.set(xlabel="TA coefficient λ", ylabel="mean clean accuracy (%)", title="Clean accuracy")
    ax_asr.legend(fontsize=8)
    ax_ca.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / "asr_ca_vs_coefficient.png"
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    writer.add_figure("merge/task_arithmetic/asr_ca_vs_coefficient", fig, 0)
    writer.close()
    plt.close(fig)
    return png
