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
