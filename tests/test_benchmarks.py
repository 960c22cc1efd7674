"""Smoke tests of benchmarks/train_bench.py and benchmarks/gpu_bench.py: tiny sizes, end to end, output files
and fields present, numbers finite and positive. No timing assertions (the targets are checked by running
the benchmarks themselves, see benchmarks/PERFORMANCE.md)."""

import json
import math

import pytest

from benchmarks import gpu_bench, train_bench


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _written(out):
    data = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert data["meta"]["code_version"] and data["meta"]["torch"] and data["meta"]["threads"] == 1
    assert data["meta"]["date"] and data["meta"]["machine"]
    return data, md


def test_train_bench_framework_and_attack(tmp_path):
    out = tmp_path / "train_bench.json"
    train_bench.main(["--parts", "framework", "attack", "--batch-size", "8", "--steps", "1", "--attack-steps", "1",
                      "--warmup", "1", "--repeats", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    data, md = _written(out)
    f, a = data["results"]["framework"], data["results"]["attack"]
    assert _positive(f["value"]) and all(_positive(v) for run in f["steps_per_s"].values() for v in run)
    assert set(f["steps_per_s"]) == {"lightning", "plain", "module_step"}
    assert f["target"] == {"metric": "lightning_over_plain_steps_per_s", "op": ">=", "value": 0.95}
    assert isinstance(f["meets_target"], bool)
    assert _positive(a["value"]) and all(_positive(v) for run in a["seconds_per_step"].values() for v in run)
    assert a["flops_per_step"]["badmerging"] > a["flops_per_step"]["clean"] > 0
    assert a["flop_ratio_expected"] == pytest.approx((12 * 3 + 4) / 24)
    assert a["target"]["value"] == 1.8 and isinstance(a["meets_target"], bool)
    # The frozen pre-trained encoder ran once per step, without autograd.
    frozen = a["frozen_encoder"]
    assert frozen["ok"] and frozen["frozen_forward_calls"] == 1
    assert not frozen["frozen_output_has_grad_fn"] and not frozen["grad_enabled_in_frozen_forward"]
    assert "framework: Lightning ÷ plain" in md and "attack: BadMerging ÷ clean" in md


def test_train_bench_data(tmp_path):
    out = tmp_path / "train_bench.json"
    train_bench.main(["--parts", "data", "--batch-size", "16", "--warmup", "1", "--data-steps", "2",
                      "--data-train-size", "96", "--data-settings", "0", "1p", "0r",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    data, md = _written(out)
    rows = data["results"]["data"]["rows"]
    assert [(r["num_workers"], r["persistent_workers"]) for r in rows] == [(0, False), (1, True), (0, False)]
    if rows[0]["decode_cache"] is not None:  # TaskDataModule has the decoded-cache option: 'r' turns it off
        assert [r["decode_cache"] for r in rows] == [True, True, False]
        assert rows[2]["dataset"] == "ImageClassificationDataset" != rows[0]["dataset"]
    for r in rows:
        assert 0 <= r["value"] < 1 and _positive(r["steps_per_s"]) and _positive(r["compute_ms_per_step"])
        assert r["wait_ms_per_step"] >= 0 and r["steps"] == 2 and isinstance(r["meets_target"], bool)
    assert "data: wait fraction, num_workers 1, persistent True" in md


def test_gpu_bench_smoke_on_cpu(tmp_path):
    report = gpu_bench.main(["--smoke", "--cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_bench_smoke.json").read_text())
    assert data["setup"]["smoke"] and data["env"]["device"] == "cpu"
    assert data["lightning_path"]["available"], data["lightning_path"]  # the project's venv has lightning
    assert data["paths"] == ["plain", "lightning"]
    rows = data["rows"]
    assert len(rows) == 3 * 2 * 2  # precisions x step kinds x paths
    for r in rows:
        assert r["error"] is None, r
        assert _positive(r["images_per_s"]) and _positive(r["steps_per_s"]) and _positive(r["model_tflop_per_step"])
        assert r["mfu"] is None and r["peak"] in ("fp32", "tf32", "bf16")  # no peak for a CPU
    assert {(r["precision"], r["tf32_on"]) for r in rows} == {("32-true", False), ("32-true", True), ("bf16-mixed", True)}
    flops = data["flops"]
    assert flops["badmerging_step"] / flops["clean_step"] == pytest.approx((6 * 3 + 2) / 12)
    assert all(_positive(next(v for k, v in q.items() if k.endswith(("_images_per_s", "_step_time")))) for q in data["ratios"])
    assert len(data["ratios"]) == 3 * (2 + 2)
    assert "SMOKE" in (tmp_path / "gpu_bench_smoke.md").read_text()
    assert report["rows"] == rows


def test_gpu_bench_plain_only_when_lightning_is_off(tmp_path):
    data = gpu_bench.main(["--smoke", "--cpu", "--no-lightning", "--steps", "1", "--out", str(tmp_path)])
    assert data["paths"] == ["plain"] and not data["lightning_path"]["available"]
    assert all(r["path"] == "plain" and _positive(r["images_per_s"]) for r in data["rows"])
    assert "Lightning path not measured" in (tmp_path / "gpu_bench_smoke.md").read_text()


def test_eval_bench_smoke(tmp_path, session_cache):
    from benchmarks import eval_bench

    report = eval_bench.run("digits", repeats=1, threads=1, cache_dir=session_cache, test_size=40, out=tmp_path,
                              train_size=200)
    assert _positive(report["ratio"]) and report["images"] == 40 and report["target"] == 1.1
    assert json.loads((tmp_path / "eval_bench.json").read_text())["code_version"]
    assert "two bare forwards" in (tmp_path / "eval_bench.md").read_text()


def test_main_job_bench_ratios_against_its_floors(tmp_path):
    """A results.json with per-node and per-stage timing -> ratios = seconds / floor, floors measured in-process."""
    from benchmarks import main_job_bench

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "shapes.json").write_text(json.dumps({"global_step": 40}))
    (tmp_path / "models" / "trigger_ontask.json").write_text(json.dumps({"steps": 20}))
    timing = {"train:shapes": {"cached": False, "seconds": 12.0, "kind": "train"},
              "train:trigger_ontask": {"cached": False, "seconds": 5.0, "kind": "train"},
              "train:digits": {"cached": True, "seconds": 99.0, "kind": "train"},
              "evaluate:clean": {"cached": False, "seconds": 8.0, "kind": "evaluate",
                                 "stages": {"evaluate/test": {"seconds": 3.0, "count": 2, "images": 6000},
                                            "merge/ties": {"seconds": 1.0, "count": 1}}},
              "evaluate:attacked:badnets": {"cached": False, "seconds": 4.0, "kind": "evaluate",
                                            "stages": {"evaluate/test": {"seconds": 1.0, "count": 1, "images": 2000}}}}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"config": {"timing": timing, "seconds": 20.0}, "rows": []}))
    assert main_job_bench.main([str(results), "--repeats", "1", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "main_job_bench.json").read_text())
    a = report["analysis"]
    f, s = a["floors"]["forward_s_per_image"], a["floors"]["train_step_s"]
    assert _positive(f) and _positive(s)
    assert a["node_seconds_sum"] == 12 + 5 + 8 + 4 and a["parallel_speedup"] == pytest.approx(29 / 20)
    assert a["seconds_by_kind"] == {"train": 17.0, "evaluate": 12.0}
    shapes = next(t for t in a["trainings"] if t["node"] == "train:shapes")
    assert shapes["steps"] == 40 and shapes["ratio"] == pytest.approx(12.0 / (40 * s))
    assert [t["node"] for t in a["trainings"]] == ["train:shapes", "train:trigger_ontask"]  # cached ones left out
    ev = a["stages"]["evaluate/test"]
    assert ev["images"] == 8000 and ev["count"] == 3 and ev["ratio"] == pytest.approx(4.0 / (8000 * f))
    assert a["stages"]["merge/ties"]["ratio"] is None
    # A warm rerun's results.json: --include_cached counts the cached node with its computing run's seconds, no wall.
    assert main_job_bench.main([str(results), "--repeats", "1", "--include_cached", "--out", str(tmp_path / "warm")]) == 0
    warm = json.loads((tmp_path / "warm" / "main_job_bench.json").read_text())["analysis"]
    assert warm["node_seconds_sum"] == 12 + 5 + 99 + 8 + 4 and warm["wall_s"] is None
    assert "train:digits" in [t["node"] for t in warm["trainings"]]
    assert "| evaluate/test | 4.0 | 3 | 8000 |" in (tmp_path / "out" / "main_job_bench.md").read_text()
