"""Result rows of merge evaluation: one ``Row`` per evaluated model (× trigger measured), and their files.

A row holds the clean accuracy of one model (``merge`` = individual / zero-shot / a plan entry's name, at
``coefficient`` λ, under ``defense``) and, when ``attack`` is set, one trigger's rates on it:

    asr             = #(triggered non-target images predicted as the target) / #(non-target images)
    ra              = #(triggered non-target images predicted correctly)     / #(non-target images)
    clean_to_target = #(clean non-target images predicted as the target)     / #(non-target images)

``attack`` is ``None`` for a clean-accuracy row (JSON null) or an ``AttackRef``. ``Row.to_dict`` writes
the keys of results.json: the always-present ones, then the optional ones that are set.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from merging.io import OutputClaim, OutputSet, claim_outputs, metadata_path
from modeling.version import code_version

__all__ = ["ATTACK_KEYS", "AttackRef", "OutputSnapshot", "RESULT_FILES", "Row", "attack_label", "attack_rows", "make_row",
           "rows_table", "stage_results", "write_results"]

#: the files of one evaluation, committed as one set (results.json last: it is the one a run prints)
RESULT_FILES = ("results.csv", "results.json")
#: a library caller (no run-level claim) waits this long for another writer of the same folder before giving up
RESULTS_WAIT_S = 60.0

#: attack metadata kept in a row's ``attack`` (never the trigger's values), in this order
ATTACK_KEYS = ("name", "mode", "trigger", "target_task", "target_task_class", "target_name", "off_task", "alpha",
               "r_range", "poison_fraction")
_OPTIONAL = ("method", "hyperparameters", "selection", "defense_alpha", "defense_selected", "defense_selection",
             "asr_hits", "asr_total", "ra_hits", "ra_total", "clean_to_target_hits", "clean_to_target_total", "scenario")


@dataclass(frozen=True)
class AttackRef:
    """Which trigger a row measures: its label, target, whether its model is in the merge, and its exported spec."""

    label: str
    target_task: str
    target_task_class: int
    in_merge: bool
    spec: Mapping[str, Any] = field(default_factory=dict)  # the ATTACK_KEYS present in the export's metadata

    @property
    def name(self) -> str | None:
        return self.spec.get("name")

    def to_dict(self) -> dict:
        values = {**self.spec, "target_task": self.target_task, "target_task_class": self.target_task_class}
        return {"label": self.label, **{k: values[k] for k in ATTACK_KEYS if k in values}, "in_merge": self.in_merge}

    @classmethod
    def from_dict(cls, data: Mapping) -> "AttackRef":
        return cls(data["label"], data["target_task"], int(data["target_task_class"]), bool(data.get("in_merge", True)),
                   _spec(data))


def _spec(attack: Mapping) -> dict:
    """The exported attack keys a reference keeps besides its typed fields."""
    return {k: attack[k] for k in ATTACK_KEYS if k in attack and k not in ("target_task", "target_task_class")}


@dataclass
class Row:
    """One line of results.json (fractions in [0, 1]); ``None`` optional fields are left out of ``to_dict``."""

    merge: str
    coefficient: float | None
    clean_acc: dict[str, float]
    mean_clean_acc: float
    normalized_acc: float | None
    attack: AttackRef | None = None
    defense: str = "none"
    asr: float | None = None
    ra: float | None = None
    clean_to_target: float | None = None
    method: str | None = None
    hyperparameters: dict | None = None
    selection: dict | None = None
    defense_alpha: float | None = None  # the defense's strength (α for IBVS)
    defense_selected: bool | None = None
    defense_selection: dict | None = None
    asr_hits: int | None = None
    asr_total: int | None = None
    ra_hits: int | None = None
    ra_total: int | None = None
    clean_to_target_hits: int | None = None
    clean_to_target_total: int | None = None
    scenario: str | None = None

    def to_dict(self) -> dict:
        out = {"merge": self.merge, "coefficient": self.coefficient,
               "attack": None if self.attack is None else self.attack.to_dict(), "defense": self.defense,
               "clean_acc": self.clean_acc, "mean_clean_acc": self.mean_clean_acc, "normalized_acc": self.normalized_acc,
               "asr": self.asr, "ra": self.ra, "clean_to_target": self.clean_to_target}
        out.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "Row":
        attack = data.get("attack")
        attack = AttackRef.from_dict(attack) if isinstance(attack, Mapping) else None
        names = {f.name for f in dataclasses.fields(cls)} - {"attack"}
        return cls(attack=attack, **{k: v for k, v in data.items() if k in names})


def make_row(merge: str, coefficient, clean_acc: dict, individual: dict | None) -> Row:
    """Clean-accuracy row: mean over tasks, and normalised = mean_t acc_t / individual_t when every task has one."""
    mean = sum(clean_acc.values()) / len(clean_acc)
    norm = None
    if individual and all(t in individual for t in clean_acc):
        norm = sum(clean_acc[t] / individual[t] for t in clean_acc) / len(clean_acc)
    return Row(merge, coefficient, clean_acc, mean, norm)


def attack_rows(row: Row, results: dict[str, dict], probes: Sequence, in_merge: set[str]) -> list[Row]:
    """One row per measured trigger: ``row``'s clean accuracy plus the trigger's reference and rates."""
    out = []
    for p in probes:
        if p.name in results:
            ref = AttackRef(p.name, p.target_task, p.target_class, p.name in in_merge, _spec(p.describe()))
            out.append(dataclasses.replace(row, attack=ref, **results[p.name]))
    return out


def _as_dict(row: Row | Mapping) -> dict:
    return row.to_dict() if isinstance(row, Row) else dict(row)


def attack_label(attack) -> str:
    """'none' for a clean row, else the trigger's label with '(not merged)' when its model is not in the merge."""
    if attack is None or isinstance(attack, str):
        return attack or "none"
    if isinstance(attack, AttackRef):
        attack = attack.to_dict()
    return attack.get("label", attack.get("name", "?")) + ("" if attack.get("in_merge", True) else " (not merged)")


def rows_table(rows: Sequence[Row | Mapping], tasks: list[str]) -> str:
    """Markdown table: one line per row, accuracy in percent."""
    head = "| merge | λ | attack | defense | " + " | ".join(tasks) + " | mean | norm | ASR | RA | clean→target |"
    lines = [head, "|" + "---|" * (9 + len(tasks))]
    for r in map(_as_dict, rows):
        accs = [f"{100 * r['clean_acc'][t]:.1f}" if t in r["clean_acc"] else "" for t in tasks]
        coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
        norm = "" if r["normalized_acc"] is None else f"{100 * r['normalized_acc']:.1f}"
        bd = ["" if r.get(k) is None else f"{100 * r[k]:.1f}" for k in ("asr", "ra", "clean_to_target")]
        defense = r["defense"] if r.get("defense_alpha") is None else f"{r['defense']} α={r['defense_alpha']:g}" + (
            " (selected)" if r.get("defense_selected") else "")
        lines.append(f"| {r['merge']} | {coef} | {attack_label(r['attack'])} | {defense} | " + " | ".join(accs)
                     + f" | {100 * r['mean_clean_acc']:.1f} | {norm} | " + " | ".join(bd) + " |")
    return "\n".join(lines)


def stage_results(directory: str | os.PathLike, config: dict, rows: Sequence[Row | Mapping], tasks: list[str]) -> Path:
    """results.json (config, code_version, rows) and results.csv written into ``directory`` (a staging folder)."""
    directory = Path(directory)
    rows = [_as_dict(r) for r in rows]
    payload = {"config": config, "code_version": code_version(), "rows": rows}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["merge", "coefficient", "attack", "in_merge", "defense", "mean_clean_acc", "normalized_acc",
                "asr", "ra", "clean_to_target", "asr_hits", "asr_total"] + [f"acc_{t}" for t in tasks]
               + ["scenario", "defense_alpha", "defense_selected"])
    for r in rows:
        in_merge = r["attack"].get("in_merge") if isinstance(r["attack"], Mapping) else None
        w.writerow([r["merge"], r["coefficient"], attack_label(r["attack"]).replace(" (not merged)", ""),
                    in_merge, r["defense"], r["mean_clean_acc"], r["normalized_acc"], r["asr"], r.get("ra"),
                    r.get("clean_to_target"), r.get("asr_hits"), r.get("asr_total")] + [r["clean_acc"].get(t) for t in tasks]
                   + [r.get("scenario"), r.get("defense_alpha"), r.get("defense_selected")])
    (directory / "results.csv").write_text(buf.getvalue())
    (directory / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    return directory / "results.json"


def write_results(out_dir: str | os.PathLike, config: dict, rows: Sequence[Row | Mapping], tasks: list[str]) -> Path:
    """results.json and results.csv in ``out_dir`` as one set (``merging.io.OutputSet``): a reader finds both files
    of one run or the previous pair, never one run's JSON beside another's CSV; a second writer waits its turn."""
    with OutputSet(out_dir, RESULT_FILES, primary="results.json", wait=RESULTS_WAIT_S) as stage:
        stage_results(stage, config, rows, tasks)
    return Path(out_dir) / "results.json"


@dataclass
class OutputSnapshot:
    """What existed before a run, so that a failed run can remove exactly what it created; and the run's claim on
    ``out_dir`` (``merging.io.OutputClaim``), so that a second run into it is refused before any work."""

    out_dir: Path | None
    created_root: Path | None  # the top directory of out_dir the run would create (None: out_dir exists)
    export: Path | None
    export_existed: bool
    sidecar_existed: bool
    claim: OutputClaim | None = field(default=None, repr=False, compare=False)

    @classmethod
    def take(cls, out_dir: str | os.PathLike | None, export: str | os.PathLike | None,
             flag: str = "--out_dir") -> "OutputSnapshot":
        """The snapshot, then the claim on ``out_dir`` (one line naming ``flag``: unwritable, or busy with another run)."""
        out = Path(out_dir) if out_dir is not None else None
        created_root, probe = None, out
        while probe is not None and not probe.exists() and probe.parent != probe:
            created_root, probe = probe, probe.parent
        export = Path(export) if export else None
        claim = claim_outputs(out, flag) if out is not None else None
        return cls(out, created_root, export, bool(export and export.exists()),
                   bool(export and metadata_path(export).exists()), claim)

    def release(self) -> None:
        """Let go of the claim on ``out_dir`` (also when the snapshot is garbage collected, or the process ends)."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def remove_partial_outputs(self) -> None:
        """After a failure: drop the export this run wrote, and directories it created (if empty).

        ``out_dir`` itself needs nothing: its files are only ever committed whole (``write_results``), and a failed
        commit is rolled back."""
        self.release()
        if self.export is not None:
            if not self.export_existed and self.export.is_file():
                self.export.unlink()
            if not self.sidecar_existed and metadata_path(self.export).is_file():
                metadata_path(self.export).unlink()
        current = self.out_dir
        while self.created_root is not None and current is not None:
            if current.exists():
                try:
                    current.rmdir()  # only if empty
                except OSError:
                    break
            if current == self.created_root:
                break
            current = current.parent
