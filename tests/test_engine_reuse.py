"""One cache, one key rule: the main job, a sweep and the BV analysis give the same training the same engine key,
and a sweep cell after a quick main job on the same cache trains nothing and reuses the main job's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

import bv
import experiments.bv as bvlib
import experiments.sweep as sweeplib
import pipeline
import sweep
from experiments.cache import ArtifactCache
from experiments.graph import RunOptions, build_graph
from experiments.spec import load_spec

SPEC = "configs/experiments/embedded.yaml"
SMOKE = "configs/sweep/embedded_smoke.yaml"
BADNETS = "configs/attack/embedded_badnets.yaml"
UT_ONLY = "configs/attack/embedded_ut_only.yaml"
QUICK = yaml.safe_load(Path(SPEC).read_text())["quick"]["overrides"]


def _main_keys(**options) -> dict[str, str]:
    """node id -> key of the main job (``pipeline.py --quick`` by default)."""
    spec = load_spec(SPEC)
    return {nid: n.key for nid, n in build_graph(spec, RunOptions(out_dir="unused", **{"quick": True, **options})).items()}


def _sweep_keys(tmp_path: Path, **settings) -> dict[str, str]:
    """node id -> key of every training / vector node of every cell of a sweep (ids as the main job's)."""
    raw = {"spec": SPEC, "out_dir": str(tmp_path / "sweep"), "cache_dir": str(tmp_path / "cache"),
           "grid": {"attacks": ["none", "badnets", "ut_only", "badmerging_ontask", "sbv"], "methods": ["task_arithmetic"],
                    "coefficients": [0.3], "defenses": ["none", "ibvs"], "seeds": [0]},
           "defenses": {"ibvs": {}}, "train_args": QUICK["encoder"], "trigger_args": QUICK["trigger"], **settings}
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = sweeplib.load_config(str(config))
    keys = {}
    for cell in sweeplib.cells(cfg):
        for nid, node in sweeplib.cell_graph(cfg, cell).nodes.items():
            if node.kind != "evaluate":
                assert keys.setdefault(nid, node.key) == node.key  # one training, one key, in every cell
    return keys


def _bv_keys(runs: list[dict], *flags: str, train_args=QUICK["encoder"], cache: str = "unused") -> dict[str, str]:
    """run name -> key of the bv.py trainings of ``runs`` (clean references named clean_<task>_s<seed>)."""
    cfg = bv.build_parser().parse_args(["analyze", "--cache_dir", cache, "--train_args", json.dumps(train_args),
                                        "--runs", json.dumps(runs), *flags])
    nodes = bvlib.paired_nodes(bvlib.parse_runs(cfg.runs, cfg.task, cfg.seed), cfg)
    return {n.payload["name"]: n.key for n in nodes.values()}


def test_same_training_same_key_in_the_main_job_a_sweep_and_the_bv_analysis(tmp_path):
    main = _main_keys()
    shipped = sweeplib.load_config(SMOKE, out_dir=str(tmp_path / "smoke"))  # the smoke grid = the quick recipes
    for cell in sweeplib.cells(shipped):
        for nid, node in sweeplib.cell_graph(shipped, cell).nodes.items():
            if node.kind == "train":
                assert node.key == main[nid], nid
    swept = _sweep_keys(tmp_path)
    assert {"train:shapes", "train:attack_ut_only", "train:trigger_ontask", "train:ibvs_backdoored_shapes",
            "vector:sbv"} <= set(swept)
    assert all(swept[nid] == main[nid] for nid in swept)

    # bv.py: the clean reference of (shapes, seed 0) is the main job's bv_clean_shapes, a BadNets run its attack;
    # a run on the main job's stage-1 trigger file (its artifact in the cache) keeps the main job's key.
    cache = tmp_path / "cache"
    trigger = _publish_fake_trigger(cache, main["train:trigger_ontask"])
    keys = _bv_keys([{"name": "badnets", "configs": [BADNETS]},
                     {"name": "ut", "configs": [UT_ONLY], "trigger_path": str(trigger)}], cache=str(cache))
    assert keys == {"clean_shapes_s0": main["train:bv_clean_shapes"], "badnets": main["train:attack_badnets"],
                    "ut": main["train:attack_ut_only"]}
    full = _main_keys(quick=False)  # the full main job and bv.py without train_args
    assert _bv_keys([{"name": "b", "configs": [BADNETS]}], train_args=[])["b"] == full["train:attack_badnets"]


def _publish_fake_trigger(cache: Path, key: str) -> Path:
    """A stage-1 trigger file in ``cache`` as the engine publishes one (no training: only its key matters here)."""
    from datamodules.triggers import TriggerSpec, init_patch, save_trigger
    from merging.io import metadata_path

    spec = TriggerSpec(size=4, seed=3)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    src = cache / "src" / "trigger.safetensors"
    src.parent.mkdir(parents=True)
    save_trigger(src, init_patch(spec, mean, std), spec, mean, std, {"engine_key": key, "task": "shapes"})
    artifacts = ArtifactCache(cache / "artifacts")
    artifacts.publish(key, {"node": "train"}, {"artifact.safetensors": src, "artifact.json": metadata_path(src)})
    return artifacts.path(key) / "artifact.safetensors"


def test_any_recipe_change_gives_a_new_key(tmp_path):
    main = _main_keys()
    base = _bv_keys([{"name": "r", "configs": [BADNETS]}])["r"]
    assert base == main["train:attack_badnets"]
    edited = tmp_path / "badnets.yaml"  # the same text elsewhere is the same recipe; other text is not
    edited.write_text(Path(BADNETS).read_text())
    assert _bv_keys([{"name": "r", "configs": [str(edited)]}])["r"] == base
    edited.write_text(Path(BADNETS).read_text() + "\n# changed\n")
    changed = {
        "config text": _bv_keys([{"name": "r", "configs": [str(edited)]}])["r"],
        "override": _bv_keys([{"name": "r", "configs": [BADNETS], "args": ["--model.init_args.target_class", "2"]}])["r"],
        "seed": _bv_keys([{"name": "r", "configs": [BADNETS], "seed": 1}])["r"],
        "train_args": _bv_keys([{"name": "r", "configs": [BADNETS]}], train_args=[*QUICK["encoder"], "--trainer.max_steps", "7"])["r"],
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    # a trigger file with other content than the cached artifact its metadata names: keyed by its own content
    cache = tmp_path / "cache"
    trigger = _publish_fake_trigger(cache, main["train:trigger_ontask"])
    copy = tmp_path / "trigger.safetensors"
    copy.write_bytes(trigger.read_bytes())
    copy.with_suffix(".json").write_bytes(trigger.with_suffix(".json").read_bytes())
    assert bvlib.file_input_key(str(copy), str(cache / "artifacts")) == main["train:trigger_ontask"]  # same content
    from datamodules.triggers import load_trigger, save_trigger

    tensor, spec, meta = load_trigger(copy)
    save_trigger(copy, tensor + 0.5, spec, meta["mean"], meta["std"], {"engine_key": meta["engine_key"]})
    assert bvlib.file_input_key(str(copy), str(cache / "artifacts")).startswith("file:")
    # sweeps: another seed, or other train_args, change every training
    seeded = _sweep_keys(tmp_path / "s1", grid={"attacks": ["none", "badnets"], "methods": ["task_arithmetic"],
                                                 "coefficients": [0.3], "seeds": [1]})
    assert seeded and all(seeded[nid] != main[nid] for nid in seeded)
    longer = _sweep_keys(tmp_path / "t", train_args=[*QUICK["encoder"], "--trainer.max_steps", "7"])
    assert all(longer[nid] != main[nid] for nid in longer if not nid.startswith("train:trigger"))


def test_a_sweep_cell_after_the_quick_main_job_trains_nothing(tmp_path, capfd):
    cache = str(tmp_path / "cache")
    out = tmp_path / "main"
    assert pipeline.main(["--quick", "--attacks", "none", "--defense", "none", "--methods", "ta", "--coefficients", "0.3",
                          "--tasks", "shapes", "digits", "--out_dir", str(out), "--cache_dir", cache]) == 0
    assert "[engine] train:shapes: running" in capfd.readouterr().out
    smoke = yaml.safe_load(Path(SMOKE).read_text())  # a smoke-sized cell: the smoke grid's recipes
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**smoke, "out_dir": str(tmp_path / "sweep"), "cache_dir": cache,
                                      "grid": {"attacks": ["none"], "methods": ["task_arithmetic"], "coefficients": [0.3]},
                                      "evaluation": {"synthetic_train_size": 600, "synthetic_test_size": 100}}))
    assert sweep.main(["--config", str(config)]) == 0
    output = capfd.readouterr().out
    assert "[engine] train:shapes: cached" in output and "[engine] train:digits: cached" in output
    assert not [line for line in output.splitlines() if line.startswith("[engine] train:") and ": running" in line]
    (entry,) = sweeplib.read_table(tmp_path / "sweep")
    for label, model in zip(entry["keys"], entry["models"]):  # the very files the main job trained
        assert os.path.samefile(model, out / "models" / f"{label}.safetensors")
