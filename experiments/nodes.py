"""Running one node of the graph: train (an encoder or a trigger), build a vector attack, evaluate a scenario.

``run_node`` is what every executor calls, in this process, a worker process or a SLURM job: it takes the
node's lock, returns at once when the cache already holds the node, and otherwise runs it and publishes the
result whole. A training keeps its checkpoints in the cache's work folder, so a killed or requeued run
resumes from its last checkpoint (Lightning's exact mid-epoch resume) instead of starting over.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from experiments.cache import ArtifactCache
from experiments.graph import Node, RunOptions, input_refs

ARTIFACT = {"train": "artifact.safetensors", "vector": "artifact.safetensors", "evaluate": "rows.json"}


def artifact_path(cache: ArtifactCache, node: Node) -> Path:
    return cache.path(node.key) / ARTIFACT[node.kind]


def run_node(node: Node, nodes: dict[str, Node], options: RunOptions) -> str:
    """Ensure ``node``'s artifact is in the cache; returns its path. Dependencies must be done already."""
    cache = ArtifactCache(options.artifacts)
    if cache.done(node.key):
        return str(artifact_path(cache, node))
    with cache.lock(node.key):
        if cache.done(node.key):  # another run finished it while this one waited
            return str(artifact_path(cache, node))
        cache.clean_stale(node.key)
        t0 = time.time()
        print(f"[engine] {node.id}: running ({node.key})", flush=True)
        files = RUNNERS[node.kind](node, nodes, cache, options)
        extra = {"id": node.id, "seconds": round(time.time() - t0, 1)}
        if "stages.json" in files:  # an evaluation's seconds per stage (decode, merge/<method>, evaluate/<split>, ...)
            extra["stages"] = json.loads(files.pop("stages.json").read_text())
        cache.publish(node.key, node.recipe, files, extra)
        print(f"[engine] {node.id}: done in {time.time() - t0:.0f}s", flush=True)
    return str(artifact_path(cache, node))


def dep_path(cache: ArtifactCache, nodes: dict[str, Node], node_id: str) -> str:
    path = artifact_path(cache, nodes[node_id])
    if not path.is_file():
        raise RuntimeError(f"{node_id} is not in the cache yet; the executor runs dependencies first")
    return str(path)


def _run_training(node: Node, nodes: dict[str, Node], cache: ArtifactCache, options: RunOptions) -> dict[str, Path]:
    from experiments.training import main as train_main
    from merging.io import load_metadata, load_state_dict, save_state_dict

    p = node.payload
    work = cache.work_dir(node.key)
    args = [x for c in p["configs"] for x in ("--config", c)] + ["--data.task", p["task"],
                                                               "--model.init_args.cache_dir", options.cache_dir]
    for arg, ref in p["inputs"].items():
        args += [f"--model.init_args.{arg}", dep_path(cache, nodes, f"train:{ref}")]
    args += p["overrides"]
    args += ["--trainer.default_root_dir", str(work), "--trainer.logger.init_args.save_dir", str(work),
             "--trainer.enable_progress_bar", "true" if options.progress else "false"]
    if any(work.rglob("last.ckpt")):
        args += ["--ckpt_path", "last"]  # an interrupted or requeued run: resume where it stopped
    cli = train_main(["fit", *args])
    out = work / "artifact.safetensors"
    extra = {"engine_key": node.key, "engine_name": p["name"]}
    if p["kind"] == "encoder":
        from callbacks.export import ExportEncoder

        written = next(cb.written for cb in cli.trainer.callbacks if isinstance(cb, ExportEncoder))
        save_state_dict(out, load_state_dict(written), {**load_metadata(written), **extra})
    else:
        from datamodules.triggers import load_trigger, save_trigger

        tensor, spec, meta = load_trigger(cli.model.trigger_path)
        keep = {k: v for k, v in meta.items() if k not in ("kind", "trigger_spec", "mean", "std")}
        save_trigger(out, tensor, spec, meta["mean"], meta["std"], {**keep, **extra})
    return _with_sidecar(out)


def _with_sidecar(out: Path) -> dict[str, Path]:
    from merging.io import metadata_path

    files = {"artifact.safetensors": out}
    if metadata_path(out).is_file():
        files["artifact.json"] = metadata_path(out)
    return files


def _run_vector(node: Node, nodes: dict[str, Node], cache: ArtifactCache, options: RunOptions) -> dict[str, Path]:
    from attacks import build_vector_attack

    v = node.payload["vector"]
    work = cache.work_dir(node.key)
    out = work / "artifact.safetensors"
    variants = {label: link_model(dep_path(cache, nodes, f"train:{ref}"), Path(options.out_dir) / "models" / f"{ref}.safetensors")
                for label, ref in v["backdoored"].items()}
    clean = link_model(dep_path(cache, nodes, f"train:{v['clean']}"),
                       Path(options.out_dir) / "models" / f"{v['clean']}.safetensors")
    build_vector_attack(v["kind"], clean, variants, {"name": node.payload["name"], **v["params"]}, v["trigger_from"], out)
    return _with_sidecar(out)


def _run_evaluation(node: Node, nodes: dict[str, Node], cache: ArtifactCache, options: RunOptions) -> dict[str, Path]:
    """The scenario's merges through the one evaluation API; its rows, tagged with the scenario."""
    import torch

    from defenses import defense_setting
    from evaluation.merge_eval import MergeEvalRequest, evaluate_merges

    p = node.payload
    models_dir = Path(options.out_dir) / "models"

    def linked(label: str, nid: str) -> str:
        return str(link_model(dep_path(cache, nodes, nid), models_dir / f"{label}.safetensors"))

    defenses = []
    for d in p["defenses"]:
        inputs = {arg: [linked(*r) for r in input_refs(ref)] if isinstance(ref, dict) else linked(*ref)
                  for arg, ref in d["inputs"].items()}
        setting = defense_setting(d["method"], inputs, strengths=d["strengths"], select=d["select"],
                                  max_drop=d["max_drop"], init_args=d.get("init_args"), report=d.get("report", "all"))
        if d.get("label"):  # the spec's name: several configurations of one defense class in one evaluation
            setting.defense.name = d["label"]
        defenses.append(setting)
    request = MergeEvalRequest(models=[linked(*m) for m in p["models"]], plan=p["plan"],
                               probe_models=[linked(*m) for m in p["probe_models"]],
                               probe_triggers=[linked(*m) for m in p["probe_triggers"]], defenses=defenses,
                               cache_dir=options.cache_dir, device="cuda" if torch.cuda.is_available() else "cpu",
                               **p["flags"])
    result = evaluate_merges(request)
    rows = [{**r.to_dict(), "scenario": p["scenario"]} for r in result.rows]
    out = cache.work_dir(node.key) / "rows.json"
    out.write_text(json.dumps(rows))
    stages = cache.work_dir(node.key) / "stages.json"
    stages.write_text(json.dumps(result.timing))
    return {"rows.json": out, "stages.json": stages}


RUNNERS = {"train": _run_training, "vector": _run_vector, "evaluate": _run_evaluation}


def link_model(src: str | os.PathLike, dst: Path) -> Path:
    """``dst`` (and its JSON sidecar) as a hard link to the cached ``src``, so a run's ``models/`` folder names
    its inputs while the cache keeps one copy; a copy where links are impossible."""
    import shutil

    from merging.io import metadata_path

    dst.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((Path(src), dst), (metadata_path(src), metadata_path(dst))):
        if not a.exists():
            continue
        if b.exists() and os.path.samefile(a, b):
            continue
        tmp = b.with_name(f".{b.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(a, tmp)
        except OSError:
            shutil.copyfile(a, tmp)
        os.replace(tmp, b)
    return dst
