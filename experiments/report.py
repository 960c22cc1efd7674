"""What people read of a run: summary.md (CA / ASR per attack × merge, IBVS before → after) and the ASR / CA
against λ figure, as a PNG and in TensorBoard. Pure functions of the rows; nothing here trains or evaluates."""

from __future__ import annotations

import os
from pathlib import Path


def _is_trigger(r: dict, label: str | None = None) -> bool:
    """A row of a measured trigger (``attack`` is its reference; clean-accuracy rows have none)."""
    return isinstance(r.get("attack"), dict) and (label is None or r["attack"]["label"] == label)


def _is_clean(r: dict) -> bool:
    return not isinstance(r.get("attack"), dict)


def write_summary(out_dir: Path, rows: list[dict], tasks: list[str], coefficients: list[float]) -> str:
    """summary.md: per attack and merge, mean CA (vs the all-clean merge), ASR, clean→target, the same trigger on
    θ_pre and on the all-clean merge, and the inherent (stage-1) trigger on this merge; then IBVS before/after."""
    plain = [r for r in rows if r.get("defense", "none") == "none"]
    clean = {r["coefficient"]: r for r in plain if r["scenario"] == "clean" and r["merge"] == "task_arithmetic"
             and _is_clean(r)}
    lines = ["| attack | merge | λ | mean CA | all-clean CA | ΔCA | ASR | clean→target | ASR on θ_pre | "
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
            ref = clean.get(r["coefficient"]) if r["merge"] == "task_arithmetic" else None
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
