"""What exported models say about themselves (task, base model, attack), checked before they are merged."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

from datamodules.triggers import load_trigger
from evaluation.evaluate import AttackProbe
from merging.io import MergeInputError, load_metadata, metadata_path, read_header_metadata

__all__ = ["attack_probe", "check_base", "model_metadata", "model_tasks", "task_of", "trigger_probes", "unique_labels"]


def model_metadata(path: str) -> dict | None:
    """A model's metadata: the JSON sidecar, else the copy in its safetensors header (a file copied alone).

    Where both exist and name a different task or base model, the model is refused: one of them was edited.
    """
    sidecar = load_metadata(path)
    header = read_header_metadata(path)  # also refuses a pickle or a corrupt file, naming it
    header = header if isinstance(header, dict) else None

    def base_of(meta: dict | None):
        described = meta.get("base_model") if meta else None
        return described.get("base_id") if isinstance(described, dict) else None

    def task_in(meta: dict | None):
        return meta.get("task") if meta else None

    for what, read in (("task", task_in), ("base", base_of)):
        theirs, ours = read(sidecar), read(header)
        if theirs and ours and theirs != ours:
            raise MergeInputError(f"{path}: its sidecar {metadata_path(path)} names {what} {theirs} but its header "
                                  f"names {ours}; one was edited, re-export the model")
    return sidecar if sidecar is not None else header


def check_base(path: str, meta: dict | None, base_id: str) -> None:
    """Refuse a model fine-tuned from another base (naming both); warn when nothing says which base it came from."""
    if not meta:
        warnings.warn(f"{path}: no JSON metadata beside it; cannot verify its task or base model", stacklevel=2)
        return
    described = meta.get("base_model")
    theirs = described.get("base_id") if isinstance(described, dict) else None
    if not theirs:
        warnings.warn(f"{path}: its metadata names no base model; cannot verify that it was fine-tuned from {base_id}",
                      stacklevel=2)
    elif theirs != base_id:
        raise MergeInputError(f"{path} was fine-tuned from {theirs}, not from the base {base_id}; pass the matching "
                              "--model_name/--pretrained, or leave this model out")


def task_of(path: str, meta: dict | None, given: str | None) -> str:
    """The task a model was fine-tuned on: its metadata's ``task``, else ``given`` (``--tasks``).

    A ``given`` task that contradicts the metadata is refused: it would evaluate the model on the wrong head.
    """
    described = meta.get("task") if meta else None
    if given and described and given != described:
        raise MergeInputError(f"{path} was fine-tuned on task {described}, but --tasks gives {given}; drop --tasks "
                              f"or give {described} in its place")
    if given or described:
        return given or described
    raise MergeInputError(f"{path}: no metadata names its task; pass --tasks in the same order as --models")


def model_tasks(paths: Sequence[str], metas: Sequence[dict | None], given: Sequence[str] | None) -> list[str]:
    """Each model's task (``task_of``); two models on one task are refused (only one of them would be evaluated)."""
    tasks = [task_of(p, m, g) for p, m, g in zip(paths, metas, given or [None] * len(paths))]
    for i, task in enumerate(tasks):
        if task in tasks[:i]:
            first = paths[tasks.index(task)]
            raise MergeInputError(f"{first} and {paths[i]} are both fine-tuned on task {task}; a merge takes one model "
                                  "per task: leave one of them out")
    return tasks


def unique_labels(paths: Sequence[str]) -> list[str]:
    """File stems, with the parent folder prepended where stems collide."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def attack_probe(path: str, meta: dict, label: str, image_size: int):
    """The AttackProbe of a backdoored export (its trigger, aimed at its target task and class)."""
    try:
        return AttackProbe.from_metadata(label, meta["attack"], image_size)
    except (KeyError, ValueError) as e:
        raise MergeInputError(f"{path}: its attack metadata is unusable ({e}); re-export it with BackdoorInjection") from None


def trigger_probes(paths: Sequence[str], image_size: int) -> list:
    """AttackProbes of stage-1 trigger files (optimised on θ_pre alone: inherent triggers), attack name ``inherent``."""
    probes = []
    for label, path in zip(unique_labels(paths), paths):
        tensor, spec, meta = load_trigger(path)
        spec.check(image_size)
        try:
            task, target = meta["task"], int(meta["target_class"])
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"--probe_triggers: {path} names no task/target_class; pass a stage-1 trigger file") from None
        attack = {"name": "inherent", "trigger": spec.to_dict(), "target_task": task, "target_task_class": target,
                  "target_name": meta.get("target_name"), "trigger_path": str(path), "mode": meta.get("mode")}
        probes.append(AttackProbe(f"inherent:{label}", tensor, spec, task, target, attack))
    return probes
