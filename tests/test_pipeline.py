"""A reduced end-to-end run of the main job: clean and attack rows in results.json, summary, plot, caching."""

import json
import math

import pipeline


def _attack_rows(rows, scenario=None):
    return [r for r in rows if not isinstance(r["attack"], str) and (scenario is None or r["scenario"] == scenario)]


def test_quick_main_job_end_to_end(tmp_path, session_cache, capsys):
    out = tmp_path / "run"
    argv = ["--quick", "--out_dir", str(out), "--cache_dir", session_cache, "--coefficients", "0.3", "0.6"]
    assert pipeline.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    assert res["code_version"] and set(res["config"]["attack_models"]) == set(pipeline.ATTACKS)
    rows = res["rows"]
    clean = [r for r in rows if r["scenario"] == "clean" and r["attack"] == "none"]
    names = [r["merge"] for r in clean]
    assert names[:4] == ["individual", "zero-shot", "task_arithmetic", "task_arithmetic"]
    assert [r["coefficient"] for r in clean[:4]] == [None, None, 0.3, 0.6]
    import yaml  # every method of the methods config, in the same table

    assert names[4:] == [e["name"] for e in yaml.safe_load(open(pipeline.METHODS_CONFIG))["plan"]]
    for r in clean:
        assert set(r["clean_acc"]) == set(pipeline.DEFAULT_TASKS) and r["asr"] is None

    # Every attack: its own scenario (its model + the clean models of the other tasks), TA at each λ and TIES,
    # with ASR / RA / clean-to-target and their counts; the attacked model alone as "individual".
    for name in pipeline.ATTACKS:
        mine = _attack_rows(rows, name)
        assert {(r["merge"], r["coefficient"]) for r in mine} == {
            ("individual", None), ("task_arithmetic", 0.3), ("task_arithmetic", 0.6), ("ties_sum", 0.3)}
        for r in mine:
            a = r["attack"]
            assert a["in_merge"] is True and a["label"] == f"attack_{name}" and a["name"] in ("badnets", "ut_only", "badmerging")
            assert a["target_task"] == ("colours" if name.endswith("offtask") else "shapes")
            for key in ("asr", "ra", "clean_to_target"):
                assert 0 <= r[key] <= 1 and r[f"{key}_total"] > 0
                assert math.isclose(r[key], r[f"{key}_hits"] / r[f"{key}_total"], rel_tol=1e-6)
        ta = next(r for r in mine if r["merge"] == "task_arithmetic")
        assert set(ta["clean_acc"]) == set(pipeline.DEFAULT_TASKS)
    # Each trigger on θ_pre and on the all-clean merges, its model not merged.
    probes = _attack_rows(rows, "clean")
    assert {(r["merge"], r["coefficient"]) for r in probes} == {("zero-shot", None), ("task_arithmetic", 0.3),
                                                                ("task_arithmetic", 0.6)}
    assert all(r["attack"]["in_merge"] is False for r in probes)
    assert len(probes) == 3 * len(pipeline.ATTACKS)

    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | task_arithmetic | 0.3 |" in summary for name in pipeline.ATTACKS)
    assert (out / "asr_ca_vs_coefficient.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert "merge/task_arithmetic/attack_badmerging_ontask/asr" in tags
    steps = [e.step for e in events.Scalars("merge/task_arithmetic/attack_badmerging_ontask/asr")]
    assert steps == [30, 60]
    for t in pipeline.DEFAULT_TASKS:
        assert (out / "models" / f"{t}.safetensors").exists() and (out / "models" / f"{t}.json").exists()

    # A rerun reuses every cached fine-tune, trigger and attack.
    assert pipeline.main(argv[:5] + ["--coefficients", "0.3", "--methods", "ta", "--attacks", "badnets", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": cached ") == len(pipeline.DEFAULT_TASKS) + 1
