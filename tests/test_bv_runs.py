"""Paired runs, bv.py (analyze, sbv) on the experiment engine, IBVS and inherent triggers in merge.py, on the
embedded model with tiny data."""

import json
import math
from pathlib import Path

import pytest
import torch

import bv
import experiments.nodes as nodes
import merge
import train
from experiments.cache import seed_overrides
from merging.backdoor_vectors import backdoor_vector, sparse_backdoor_vector
from merging.io import load_metadata, load_state_dict

TINY = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false",
        "--data.synthetic_train_size", "200", "--data.synthetic_test_size", "40", "--data.batch_size", "16"]
BADNETS = "configs/attack/embedded_badnets.yaml"


def _fit(root: Path, cache: str, configs: list[str], extra=()) -> tuple[Path, list[str]]:
    args = ["fit", "--config", "configs/experiment/embedded_injection.yaml"]
    for c in configs:
        args += ["--config", c]
    cli = train.main([*args, "--data.task", "shapes", "--model.init_args.cache_dir", cache,
                      "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                      "--trainer.callbacks+", "callbacks.batch_fingerprint.BatchFingerprint", *TINY, *extra])
    from callbacks.batch_fingerprint import BatchFingerprint

    prints = next(c for c in cli.trainer.callbacks if isinstance(c, BatchFingerprint)).fingerprints
    return next(root.rglob("encoder.safetensors")), prints


def test_paired_runs_see_identical_clean_batches(tmp_path, session_cache):
    clean, clean_prints = _fit(tmp_path / "clean", session_cache, ["configs/bv/embedded_clean_reference.yaml"])
    bd, bd_prints = _fit(tmp_path / "bd", session_cache, [BADNETS])
    assert len(clean_prints) == 4 and clean_prints == bd_prints  # same images and labels at every step
    other, other_prints = _fit(tmp_path / "seed1", session_cache, [BADNETS], seed_overrides(1))
    assert other_prints != clean_prints  # the fingerprint does tell different data orders apart
    assert load_metadata(clean)["kind"] == "finetune" and not load_metadata(clean).get("attack")
    bv_ = backdoor_vector(load_state_dict(bd), load_state_dict(clean))
    assert any(float(t.abs().max()) > 0 for t in bv_.values())  # the attack moved the weights


def _cfg_args(tmp_path, cache):
    """Flags of a tiny bv.py run writing to ``tmp_path``; its trainings are cached in ``cache``."""
    return ["--out_dir", str(tmp_path), "--cache_dir", cache, "--train_args", json.dumps(TINY),
            "--synthetic_train_size", "200", "--synthetic_test_size", "40", "--device", "cpu"]


@pytest.fixture(scope="module")
def sbv_run(tmp_path_factory, session_cache):
    out = tmp_path_factory.mktemp("sbv")
    variants = [{"name": "br", "configs": [BADNETS]},
                {"name": "tl", "configs": [BADNETS], "args": ["--model.init_args.trigger.location", "top_left"]},
                {"name": "br_s1", "seed": 1, "configs": [BADNETS]}]
    outputs = [{"name": "sbv", "combine": "sum", "k": 30, "scale": 1.5},
               {"name": "sbv_sc", "combine": "mean", "k": 100, "sign_consistent": True}]
    built = bv.main(["sbv", *_cfg_args(out, session_cache), "--variants", json.dumps(variants),
                     "--outputs", json.dumps(outputs), "--trigger_from", "br"])
    return out, built


def test_sbv_exports_clean_plus_scaled_sparse_combination(sbv_run):
    out, built = sbv_run
    assert [p.name for p in built] == ["sbv.safetensors", "sbv_sc.safetensors"]
    models = out / "models"
    clean = load_state_dict(models / "clean_shapes_s0.safetensors")
    bvs = [backdoor_vector(load_state_dict(models / f"{n}.safetensors"), clean) for n in ("br", "tl", "br_s1")]
    for path, (combine, k, sc, scale) in zip(built, [("sum", 30, False, 1.5), ("mean", 100, True, 1.0)]):
        ref = sparse_backdoor_vector(bvs, combine, k, sc)
        got = backdoor_vector(load_state_dict(path), clean)
        for key in ref:
            assert torch.allclose(got[key], scale * ref[key], atol=1e-6), key
        meta = load_metadata(path)
        assert meta["attack"]["name"] == path.stem and meta["attack"]["trigger"]["location"] == "bottom_right"
        assert meta["attack"]["sbv"]["combine"] == combine and meta["attack"]["sbv"]["k"] == k
        assert meta["task"] == "shapes" and meta["base_model"]
    nonzero = load_metadata(built[0])["attack"]["sbv"]["nonzero_fraction"]
    assert 0.25 < nonzero <= 0.31  # 30% per tensor (rounded), minus exact zeros
    assert (out / "sbv_config.json").exists()


def test_sbv_array_tasks_then_build(sbv_run, session_cache, tmp_path):
    out, _ = sbv_run
    variants = [{"name": "br", "configs": [BADNETS]}]
    args = ["sbv", *_cfg_args(out, session_cache), "--variants", json.dumps(variants)]
    assert bv.main([*args, "--array_index", "1"]) == []  # cached run: trains nothing, builds nothing
    with pytest.raises(bv.BVInputError, match="out of range"):
        bv.main([*args, "--array_index", "2"])
    built = bv.main([*args, "--build_only", "true", "--outputs", json.dumps([{"name": "only_br"}])])
    assert built[0].exists()
    fresh = ["sbv", *_cfg_args(tmp_path, str(tmp_path / "empty_cache")), "--variants", json.dumps(variants),
             "--build_only", "true"]
    with pytest.raises(bv.BVInputError, match="not trained yet"):  # another cache: nothing trained there
        bv.main(fresh)


def test_analyze_writes_matrices_figures_and_findings(sbv_run, session_cache):
    out, _ = sbv_run
    runs = [{"name": "br", "configs": [BADNETS]},
            {"name": "tl", "configs": [BADNETS], "args": ["--model.init_args.trigger.location", "top_left"]},
            {"name": "br_s1", "seed": 1, "configs": [BADNETS]}]
    path = bv.main(["analyze", *_cfg_args(out, session_cache), "--runs", json.dumps(runs), "--scales", "0", "1"])
    res = json.loads(path.read_text())
    cos = res["cosine"]
    assert len(cos) == 3 and all(math.isclose(cos[i][i], 1.0, abs_tol=1e-9) for i in range(3))
    assert all(math.isclose(cos[i][j], cos[j][i]) for i in range(3) for j in range(3))
    assert set(res["findings"]) == {"across_location", "across_seed"}
    t = res["transfer"]
    for i in range(3):
        for j in range(3):
            hits, total = t["counts"][i][j]
            assert total > 0 and math.isclose(t["asr"][i][j], hits / total, rel_tol=1e-6)
    # λ = 1 on the run's own BV is the backdoored model itself: the diagonal of the transfer matrix.
    diag = {s["run"]: s for s in res["scaling"] if s["scale"] == 1}
    assert math.isclose(diag["br"]["asr"], t["asr"][0][0], abs_tol=1e-6)
    zero = next(s for s in res["scaling"] if s["scale"] == 0)
    assert zero["asr"] <= diag["br"]["asr"] + 1e-9 or True  # tiny runs: only the bookkeeping is checked here
    for png in ("bv_cosine", "bv_cosine_blocks", "bv_transfer", "bv_scaling"):
        assert (out / f"{png}.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"bv/cosine", "bv/cosine_blocks", "bv/transfer", "bv/scaling"} <= set(events.Tags()["images"])
    assert "bv/scaling/br/asr" in events.Tags()["scalars"]
    assert (out / "cosine.csv").read_text().splitlines()[0] == ",br,tl,br_s1"


def test_cli_list_flags_and_one_line_errors_before_any_training(tmp_path, monkeypatch, capsys):
    cfg = bv.build_parser().parse_args(["sbv", "--config", "configs/bv/embedded_sbv.yaml", "--jobs", "4",
                                        "--devices", "0", "1", "2", "3"])  # the README's command
    assert cfg.jobs == 4 and cfg.devices == [0, 1, 2, 3] and len(cfg.variants) == 3
    with pytest.raises(SystemExit) as e:
        bv.main(["sbv", "--config", "configs/bv/embedded_sbv.yaml", "--devices", "0", "1", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "devices:\n- 0\n- 1\n" in printed and "badmerging_s1" in printed  # YAML, reusable with --config

    def forbidden(*args):
        raise AssertionError("bad input must stop before any training")

    monkeypatch.setitem(nodes.RUNNERS, "train", forbidden)
    runs = [{"name": "a", "configs": [BADNETS]}, {"name": "b", "configs": [BADNETS], "seed": 1}]
    base = ["analyze", "--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    cases = {
        "scaling_runs: ['c'] are not run names": [*base, "--runs", json.dumps(runs), "--scaling_runs", "a", "c"],
        "nope.safetensors does not exist": [*base, "--runs", json.dumps(runs + [{"name": "m", "model": "nope.safetensors"}])],
        "unknown option or config key 'devicez'": [*base, "--devicez", "0"],
        "--config nope.yaml: file not found": [*base, "--config", "nope.yaml"],
    }
    for message, argv in cases.items():
        assert bv.cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bv.py: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_merge_ibvs_rows_and_alpha_zero_identity(sbv_run, session_cache, tmp_path):
    out, built = sbv_run
    models = out / "models"
    argv = ["--models", str(built[0]), "--coefficients", "0.3", "--out_dir", str(tmp_path / "m"), "--cache_dir",
            session_cache, "--synthetic_train_size", "200", "--synthetic_test_size", "40", "--val_max_examples", "20",
            "--individual", "false", "--zero_shot", "false", "--defense", "ibvs",
            "--ibvs_clean", str(models / "clean_shapes_s0.safetensors"), "--ibvs_backdoored", str(models / "tl.safetensors"),
            "--ibvs_alphas", "0", "1", "--ibvs_max_drop", "1.0"]
    assert merge.main(argv) == 0
    rows = json.loads((tmp_path / "m" / "results.json").read_text())["rows"]
    plain = [r for r in rows if r["defense"] == "none"]
    zero = [r for r in rows if r.get("defense_alpha") == 0]
    one = [r for r in rows if r.get("defense_alpha") == 1]
    assert len(plain) == len(zero) == len(one) == 2  # clean row + the SBV's trigger row each
    for a, b in zip(plain, zero):
        assert a["clean_acc"] == b["clean_acc"] and a["asr"] == b["asr"]
    assert all(r["defense"] == "ibvs" for r in zero + one)
    assert all(r["defense_selected"] for r in one) and not any(r["defense_selected"] for r in zero)  # max_drop 1: largest α
    assert one[0]["defense_selection"]["chosen"] == 1
    csv_head = (tmp_path / "m" / "results.csv").read_text().splitlines()[0]
    assert csv_head.endswith("defense_alpha,defense_selected")


def test_merge_ibvs_bad_input_is_one_line(tmp_path, capsys):
    model = "outputs/none.safetensors"
    assert merge.main(["--models", model, "--defense", "ibvs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("merge.py: error:")


def test_inherent_trigger_probe(sbv_run, session_cache, tmp_path):
    from datamodules.triggers import TriggerSpec, init_patch, save_trigger

    out, built = sbv_run
    spec = TriggerSpec(size=6, seed=3)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    trig = tmp_path / "trigger_ontask.safetensors"
    save_trigger(trig, init_patch(spec, mean, std), spec, mean, std, {"stage": 1, "mode": "on_task", "task": "shapes",
                                                                     "target_class": 1, "target_name": "square"})
    argv = ["--models", str(out / "models" / "clean_shapes_s0.safetensors"), "--coefficients", "0.3", "--out_dir",
            str(tmp_path / "m"), "--cache_dir", session_cache, "--synthetic_train_size", "200", "--synthetic_test_size", "40",
            "--individual", "false", "--probe_triggers", str(trig)]
    assert merge.main(argv) == 0
    rows = json.loads((tmp_path / "m" / "results.json").read_text())["rows"]
    inherent = [r for r in rows if isinstance(r["attack"], dict)]  # a clean row's attack is null
    assert [r["merge"] for r in inherent] == ["zero-shot", "task_arithmetic"]
    for r in inherent:
        assert r["attack"]["name"] == "inherent" and r["attack"]["in_merge"] is False
        assert r["attack"]["label"] == "inherent:trigger_ontask" and r["asr_total"] > 0
