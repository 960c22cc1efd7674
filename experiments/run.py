"""Run a spec: build its graph, execute what the cache lacks, gather the rows, write the outputs.

    from experiments.run import run_experiment
    results_json = run_experiment(load_spec("configs/experiments/embedded.yaml"), RunOptions(out_dir="outputs/x"))

Outputs in ``out_dir``: ``spec.yaml`` (the resolved spec), ``models/`` (links to the cached artifacts, named
as in the rows), ``results.json`` (spec, options, model paths, per-node keys and seconds, every row with its
``scenario``), ``results.csv``, ``summary.md``, ``asr_ca_vs_coefficient.png`` and TensorBoard events. They are
written as one set (``merging.io.OutputSet``): staged beside ``out_dir`` while the run works, committed at the end,
so a killed run leaves the previous complete set (or no ``out_dir``) and a second run into it is refused at once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from experiments.cache import ArtifactCache
from experiments.cli import UserError
from experiments.graph import RunOptions, attack_model, build_graph
from experiments.nodes import artifact_path, link_model
from experiments.spec import ExperimentSpec

#: the run's files in out_dir, committed as one set (results.json last); a name this run does not write is removed
#: (an older run's figure never stays beside newer results); anything else the run writes is committed with them
OUTPUT_FILES = ("spec.yaml", "models", "tensorboard", "summary.md", "asr_ca_vs_coefficient.png", "matrix.csv",
                "asr_matrix.png", "delta_ca_matrix.png", "asr_matrix_defended.png", "delta_ca_matrix_defended.png",
                "results.csv", "results.json")


def run_experiment(spec: ExperimentSpec, options: RunOptions, executor=None, report: bool = True) -> Path:
    """Everything ``spec`` needs, through ``executor`` (default: LocalExecutor(1)); returns results.json's path."""
    from merging.io import OutputSet

    check_data(spec)
    out_dir = Path(options.out_dir)
    with OutputSet(out_dir, OUTPUT_FILES, primary="results.json") as stage:  # claimed before any work
        _run(spec, options, executor, report, out_dir, stage)
    return out_dir / "results.json"


def _run(spec: ExperimentSpec, options: RunOptions, executor, report: bool, out_dir: Path, stage: Path) -> Path:
    """The run, its outputs written into ``stage`` (the staging folder of ``out_dir``)."""
    from experiments.executors import LocalExecutor

    t0 = time.time()
    ensure_base(spec)
    nodes = build_graph(spec, options)
    cache = ArtifactCache(options.artifacts)
    cached = {nid for nid, n in nodes.items() if cache.done(n.key)}
    write_spec(stage, spec)
    # the nodes link their models into the staging folder too; results.json names the committed paths
    (executor or LocalExecutor()).run(nodes, dataclasses.replace(options, out_dir=str(stage)))
    rows = []
    for node in nodes.values():
        if node.kind == "evaluate":
            rows += json.loads(artifact_path(cache, node).read_text())
    models = link_models(spec, nodes, cache, out_dir, stage)
    timing = node_timing(nodes, cache, cached)
    config = {"spec": dataclasses.asdict(spec), "options": dataclasses.asdict(options), **models,
              "nodes": {nid: n.key for nid, n in nodes.items()}, "timing": timing, "seconds": round(time.time() - t0, 1)}
    return write_outputs(stage, spec, config, rows, report)


def node_timing(nodes, cache: ArtifactCache, cached: set[str]) -> dict[str, dict]:
    """Per node: whether this run found it cached, the seconds it took when it ran (this run or the one that made
    the cached artifact) and, for evaluations, the seconds per stage (decode/<split>, merge/<method>,
    evaluate/<split> with its encoder inputs, defense_prepare/<defense>, defense_apply/<defense>) with their calls."""
    out = {}
    for nid, n in nodes.items():
        recipe = cache.recipe(n.key)
        out[nid] = {"cached": nid in cached, "seconds": recipe.get("seconds"), "kind": n.kind}
        if "stages" in recipe:
            out[nid]["stages"] = recipe["stages"]
    return out


def check_data(spec: ExperimentSpec) -> None:
    """Every task the spec trains or evaluates on has its data (a local folder of ``evaluation.data_dirs`` or the
    task's own, else its hub dataset), checked without reading it: a missing one stops the run before any
    training, in one line naming the task and how to provide it."""
    from datamodules.hf_data import DatasetError, check_task_source
    from datamodules.tasks import get_task

    tasks = dict.fromkeys([*spec.tasks, *(t.task for t in spec.all_trainings().values())])
    for name in tasks:
        task, folder = get_task(name), spec.evaluation.data_dirs.get(name)
        if task.synthetic and folder is None:
            continue  # rendered by the project
        try:
            check_task_source(task, folder, local=f"its folder in the spec's evaluation.data_dirs ({{{name}: <dir>}})")
        except DatasetError as e:
            where = f"evaluation.data_dirs {name}: " if folder is not None else ""
            raise UserError(f"{where}{e}") from None


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


def link_models(spec: ExperimentSpec, nodes, cache: ArtifactCache, out_dir: Path, stage: Path | None = None) -> dict:
    """``models/<name>.safetensors`` for every trained or built model (linked in ``stage``, default ``out_dir``);
    the clean and attack paths by name, under ``out_dir``."""
    models, final = (stage or out_dir) / "models", out_dir / "models"
    for nid, node in nodes.items():
        if node.kind == "train":
            link_model(artifact_path(cache, node), models / f"{node.payload['name']}.safetensors")
    attack_models = {}
    for a in spec.attacks:
        label, nid = attack_model(spec, a.name)
        attack_models[a.name] = str(final / link_model(artifact_path(cache, nodes[nid]), models / f"{label}.safetensors").name)
    clean = {t: str(final / f"{name}.safetensors") for t, name in spec.clean_models().items()}
    return {"clean_models": clean, "attack_models": attack_models}


def write_outputs(out_dir: Path, spec: ExperimentSpec, config: dict, rows: list[dict], report: bool) -> Path:
    """results.json / .csv, summary.md, the plot and TensorBoard events into ``out_dir`` (the run's staging folder)."""
    from evaluation.rows import rows_table, stage_results
    from experiments.report import plot_and_log, write_matrix, write_summary

    tasks = list(spec.tasks)
    results = stage_results(out_dir, config, rows, tasks)
    print(rows_table([r for r in rows if r["scenario"] == "clean" and not isinstance(r.get("attack"), dict)], tasks))
    if report and spec.attacks:
        print(write_summary(out_dir, rows, tasks, [], headline=spec.headline_coefficient))
        png = plot_and_log(out_dir, rows, [])
        write_matrix(out_dir, rows, spec.headline_coefficient)  # after the plot: it clears old TensorBoard events
        print(f"[engine] figures: {png.name if png else '(none)'}, asr_matrix.png, delta_ca_matrix.png; cells: matrix.csv")
    print(f"[engine] done in {config['seconds']:.0f}s", flush=True)
    return results


def default_jobs(quick: bool) -> int:
    """``--jobs`` when not given: 1 for the reduced run (worker start-up would dominate it), else one worker per
    core up to 4 (a worker runs one node with one torch thread: two workers on two cores measured 1.9× the
    throughput of one)."""
    import os

    return 1 if quick else max(1, min(os.cpu_count() or 1, 4))


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
    import os

    jobs = default_jobs(a.quick) if a.jobs is None else a.jobs
    if a.executor == "slurm":
        executor = SubmititExecutor(a.slurm_folder, partition=a.slurm_partition, timeout_min=a.slurm_timeout_min,
                                    gpus_per_node=a.slurm_gpus_per_node)
    else:
        executor = LocalExecutor(jobs)
    progress = not (os.environ.get("CI") or os.environ.get("BADMERGING_JOB_WORKER")) and jobs == 1
    options = RunOptions(out_dir=a.out_dir, cache_dir=a.cache_dir, quick=a.quick, progress=progress,
                         train_overrides=list(a.train_overrides))
    return run_experiment(spec, options, executor)
