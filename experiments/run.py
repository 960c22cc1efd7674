"""Run a spec: build its graph, execute what the cache lacks, gather the rows, write the outputs.

    from experiments.run import run_experiment
    results_json = run_experiment(load_spec("configs/experiments/embedded.yaml"), RunOptions(out_dir="outputs/x"))

Outputs in ``out_dir``: ``spec.yaml`` (the resolved spec), ``models/`` (links to the cached artifacts, named
as in the rows), ``results.json`` (spec, options, model paths, per-node keys and seconds, every row with its
``scenario``), ``results.csv``, ``summary.md``, ``asr_ca_vs_coefficient.png`` and TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from experiments.cache import ArtifactCache
from experiments.graph import RunOptions, attack_model, build_graph
from experiments.nodes import artifact_path, link_model
from experiments.spec import ExperimentSpec


def run_experiment(spec: ExperimentSpec, options: RunOptions, executor=None, report: bool = True) -> Path:
    """Everything ``spec`` needs, through ``executor`` (default: LocalExecutor(1)); returns results.json's path."""
    from experiments.executors import LocalExecutor

    t0 = time.time()
    ensure_base(spec)
    out_dir = Path(options.out_dir)
    nodes = build_graph(spec, options)
    cache = ArtifactCache(options.artifacts)
    cached = {nid for nid, n in nodes.items() if cache.done(n.key)}
    write_spec(out_dir, spec)
    (executor or LocalExecutor()).run(nodes, options)
    rows = []
    for node in nodes.values():
        if node.kind == "evaluate":
            rows += json.loads(artifact_path(cache, node).read_text())
    models = link_models(spec, nodes, cache, out_dir)
    timing = {nid: ("cached" if nid in cached else cache.recipe(n.key).get("seconds")) for nid, n in nodes.items()}
    config = {"spec": dataclasses.asdict(spec), "options": dataclasses.asdict(options), **models,
              "nodes": {nid: n.key for nid, n in nodes.items()}, "timing": timing, "seconds": round(time.time() - t0, 1)}
    return write_outputs(out_dir, spec, config, rows, report)


def ensure_base(spec: ExperimentSpec) -> None:
    """The embedded base model is shipped; rebuild it (deterministic pre-training) if someone deleted it."""
    from modeling.clip import EMBEDDED_MODEL, EMBEDDED_WEIGHTS

    if spec.base.model_name == EMBEDDED_MODEL and spec.base.pretrained is None and not EMBEDDED_WEIGHTS.exists():
        from modeling.pretrain import pretrain

        print(f"[engine] building the embedded base model -> {EMBEDDED_WEIGHTS}", flush=True)
        pretrain(EMBEDDED_WEIGHTS)


def write_spec(out_dir: Path, spec: ExperimentSpec) -> Path:
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "spec.yaml"
    tmp = path.with_name(".spec.yaml.tmp")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    tmp.replace(path)
    return path


def link_models(spec: ExperimentSpec, nodes, cache: ArtifactCache, out_dir: Path) -> dict:
    """``models/<name>.safetensors`` for every trained or built model; the clean and attack paths by name."""
    models = out_dir / "models"
    for nid, node in nodes.items():
        if node.kind == "train":
            link_model(artifact_path(cache, node), models / f"{node.payload['name']}.safetensors")
    attack_models = {}
    for a in spec.attacks:
        label, nid = attack_model(spec, a.name)
        attack_models[a.name] = str(link_model(artifact_path(cache, nodes[nid]), models / f"{label}.safetensors"))
    clean = {t: str(models / f"{name}.safetensors") for t, name in spec.clean_models().items()}
    return {"clean_models": clean, "attack_models": attack_models}


def write_outputs(out_dir: Path, spec: ExperimentSpec, config: dict, rows: list[dict], report: bool) -> Path:
    from evaluation.rows import rows_table, write_results
    from experiments.report import plot_and_log, write_summary

    tasks = list(spec.tasks)
    results = write_results(out_dir, config, rows, tasks)
    print(rows_table([r for r in rows if r["scenario"] == "clean" and not isinstance(r.get("attack"), dict)], tasks))
    if report and spec.attacks:
        print(write_summary(out_dir, rows, tasks, []))
        png = plot_and_log(out_dir, rows, [])
        print(f"[engine] plot: {png}")
    print(f"[engine] done in {config['seconds']:.0f}s", flush=True)
    return results


def run_pipeline(a) -> Path:
    """``pipeline.py``'s settings (a namespace) -> the narrowed spec, options and executor, then the run.

    Every flag is checked against the spec before any work: an unknown task, attack or defense, a bad
    ``--jobs`` or an output folder that cannot be written stops here with one line.
    """
    from experiments.cli import UserError, check_output_path
    from experiments.executors import LocalExecutor, SubmititExecutor
    from experiments.spec import load_spec, restrict

    spec = load_spec(a.spec)
    names = [d.name for d in spec.defenses]
    if a.defense not in ("all", "none", *names):
        raise UserError(f"--defense={a.defense!r}; use all, none or one of {', '.join(names) or '(none in the spec)'}")
    defenses = None if a.defense == "all" else ([] if a.defense == "none" else [a.defense])
    attacks = None if a.attacks is None else ([] if a.attacks == ["none"] else list(a.attacks))
    if a.coefficients is not None and not a.coefficients:
        raise UserError("--coefficients is empty; give at least one λ")
    spec = restrict(spec, tasks=a.tasks, attacks=attacks, defenses=defenses, coefficients=a.coefficients,
                    ta_only=a.methods == "ta")
    check_output_path(a.out_dir, "--out_dir", is_dir=True, error=UserError)
    check_output_path(a.cache_dir, "--cache_dir", is_dir=True, error=UserError)
    if a.executor == "slurm":
        executor = SubmititExecutor(a.slurm_folder, partition=a.slurm_partition, timeout_min=a.slurm_timeout_min,
                                    gpus_per_node=a.slurm_gpus_per_node)
    else:
        executor = LocalExecutor(a.jobs)
    import os

    progress = not (os.environ.get("CI") or os.environ.get("BADMERGING_JOB_WORKER")) and a.jobs == 1
    options = RunOptions(out_dir=a.out_dir, cache_dir=a.cache_dir, quick=a.quick, progress=progress,
                         train_overrides=list(a.train_overrides))
    return run_experiment(spec, options, executor)
