"""A reduced end-to-end run of the main job: clean, attack, SBV and IBVS rows in results.json, the attack × method
matrix (every cell with its counts, heat-maps, summary), per-stage timings, plot, caching."""

import csv
import json
import math

import pipeline
from experiments.spec import load_spec

SPEC = load_spec(pipeline.DEFAULT_SPEC)
TASKS = SPEC.tasks
EVERY = [a.name for a in SPEC.attacks]
SBV = {a.name: a.vector.params for a in SPEC.attacks if a.vector}
IBVS_ALPHAS = SPEC.defenses[0].strengths
METHODS_CONFIG = "configs/merge/embedded_matrix.yaml"


def _attack_rows(rows, scenario=None, defense="none"):
    """Rows of the backdoors' own triggers (not the inherent stage-1 triggers), undefended by default."""
    return [r for r in rows if isinstance(r["attack"], dict) and r["attack"]["name"] != "inherent"
            and (scenario is None or r["scenario"] == scenario) and r["defense"] == defense]


def test_quick_main_job_end_to_end(tmp_path, session_cache, capsys):
    out = tmp_path / "run"
    argv = ["--quick", "--out_dir", str(out), "--cache_dir", session_cache, "--coefficients", "0.3", "0.6"]
    assert pipeline.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    every = EVERY
    assert res["code_version"] and set(res["config"]["attack_models"]) == set(every)
    rows = res["rows"]
    clean = [r for r in rows if r["scenario"] == "clean" and r["attack"] is None]
    assert all(r["defense"] == "none" for r in rows if r["scenario"] == "clean")
    names = [r["merge"] for r in clean]
    assert names[:4] == ["individual", "zero-shot", "task_arithmetic", "task_arithmetic"]
    assert [r["coefficient"] for r in clean[:4]] == [None, None, 0.3, 0.6]
    import yaml  # every method of the methods config, in the same table

    assert names[4:] == [e["name"] for e in yaml.safe_load(open(METHODS_CONFIG))["plan"]]
    for r in clean:
        assert set(r["clean_acc"]) == set(TASKS) and r["asr"] is None

    # Every attack: its own scenario (its model + the clean models of the other tasks) under every method of the
    # matrix (TA at each λ, the others at their rule's coefficient), with ASR / RA / clean-to-target and their
    # counts; the attacked model alone as "individual".
    matrix_methods = [e["name"] for e in yaml.safe_load(open(METHODS_CONFIG))["plan"]]
    for name in every:
        mine = _attack_rows(rows, name)
        assert [r["merge"] for r in mine] == ["individual", "task_arithmetic", "task_arithmetic", *matrix_methods]
        assert [r["coefficient"] for r in mine[:3]] == [None, 0.3, 0.6]
        for r in mine:
            a = r["attack"]
            assert a["in_merge"] is True and a["label"] == f"attack_{name}"
            assert a["name"] == {"badmerging_ontask": "badmerging", "badmerging_offtask": "badmerging"}.get(name, name)
            assert a["target_task"] == ("colours" if name.endswith("offtask") else "shapes")
            for key in ("asr", "ra", "clean_to_target"):
                assert 0 <= r[key] <= 1 and r[f"{key}_total"] > 0
                assert math.isclose(r[key], r[f"{key}_hits"] / r[f"{key}_total"], rel_tol=1e-6)
        ta = next(r for r in mine if r["merge"] == "task_arithmetic")
        assert set(ta["clean_acc"]) == set(TASKS)
        # IBVS on every merge of the matrix (TA at λ 0.3 only): every α scored on val, the selected one on test.
        defended = _attack_rows(rows, name, defense="ibvs")
        assert [(r["merge"], r["coefficient"]) for r in defended] == [("task_arithmetic", 0.3)] + [
            (r["merge"], r["coefficient"]) for r in mine[3:]]
        for r in defended:
            assert r["defense_selected"] is True and r["defense_alpha"] == r["defense_selection"]["chosen"]
            assert sorted(r["defense_selection"]["scores"]) == sorted(map(str, IBVS_ALPHAS)) or sorted(
                map(float, r["defense_selection"]["scores"])) == IBVS_ALPHAS
        # The inherent (stage-1, θ_pre-only) triggers are measured on the same merges, beside every attack.
        inherent = [r for r in rows if r["scenario"] == name and isinstance(r["attack"], dict)
                    and r["attack"]["name"] == "inherent" and r["defense"] == "none"]
        assert {r["attack"]["label"] for r in inherent} == {"inherent:trigger_ontask", "inherent:trigger_offtask"}
        assert all(r["attack"]["in_merge"] is False and r["asr_total"] > 0 for r in inherent)
        assert {r["merge"] for r in inherent} == {"task_arithmetic"}  # measure_attacks: merged on the other methods

    # The matrix: every attack (and the all-clean merge) × every method, undefended and under IBVS, with counts.
    with open(out / "matrix.csv") as f:
        cells = list(csv.DictReader(f))
    columns = ["task_arithmetic", *matrix_methods]
    for attack in ["none", *every]:
        for defense in (["none"] if attack == "none" else ["none", "ibvs"]):
            got = [c for c in cells if c["attack"] == attack and c["defense"] == defense]
            assert [c["method"] for c in got] == columns, (attack, defense)
            for c in got:
                assert 0 <= float(c["mean_clean_acc"]) <= 1 and c["delta_ca"] != ""
                if attack == "none":
                    assert float(c["delta_ca"]) == 0 and c["asr"] == ""
                    continue
                for key in ("asr", "ra", "clean_to_target"):
                    hits, total = int(c[f"{key}_hits"]), int(c[f"{key}_total"])
                    assert total > 0 and math.isclose(float(c[key]), hits / total, rel_tol=1e-6)
    ca = {(r["scenario"], r["merge"], r["coefficient"], r["defense"]): r["mean_clean_acc"]
          for r in rows if r["attack"] is None}
    c = next(c for c in cells if c["attack"] == every[0] and c["method"] == "ties_sum" and c["defense"] == "none")
    assert math.isclose(float(c["delta_ca"]), ca[(every[0], "ties_sum", 0.3, "none")] - ca[("clean", "ties_sum", 0.3, "none")],
                        abs_tol=1e-9)
    for png in ("asr_matrix.png", "delta_ca_matrix.png", "asr_matrix_defended.png", "delta_ca_matrix_defended.png"):
        assert (out / png).stat().st_size > 1000, png
    # Per-stage seconds of every node in results.json: trainings as a whole, evaluations per stage.
    timing = res["config"]["timing"]
    assert set(timing) == set(res["config"]["nodes"])
    for nid, t in timing.items():
        # A node another test of the session already computed (the IBVS-variant spec shares the main job's trainings
        # by design) is cached; it keeps the seconds of the run that computed it.
        assert isinstance(t["cached"], bool) and t["seconds"] >= 0, nid
        if t["kind"] == "train":
            assert t["seconds"] > 0, nid
    assert not timing[f"evaluate:attacked:{every[0]}"]["cached"]  # this spec's own defenses: computed here
    stages = timing[f"evaluate:attacked:{every[0]}"]["stages"]
    for method in ("task_arithmetic", "weight_average", "ties", "dare", "breadcrumbs", "consensus", "regmean", "adamerging"):
        assert stages[f"merge/{method}"]["count"] >= 1, method
    assert stages["evaluate/test"]["seconds"] > 0 and stages["evaluate/val"]["count"] > 0
    assert stages["defense_apply/ibvs"]["count"] >= len(columns) * len(IBVS_ALPHAS)

    # SBV exports: θ_clean + SBV of the variants' BVs, with the trigger of BadMerging on-task.
    from merging.io import load_metadata

    for name, spec in SBV.items():
        meta = load_metadata(res["config"]["attack_models"][name])
        assert meta["attack"]["sbv"]["combine"] == spec["combine"] and meta["attack"]["sbv"]["k"] == spec["k"]
        assert len(meta["attack"]["sbv"]["variants"]) == 2
    # Each trigger on θ_pre and on the all-clean merges, its model not merged.
    probes = _attack_rows(rows, "clean")
    assert {(r["merge"], r["coefficient"]) for r in probes} == {("zero-shot", None), ("task_arithmetic", 0.3),
                                                                ("task_arithmetic", 0.6)}
    assert all(r["attack"]["in_merge"] is False for r in probes)
    assert len(probes) == 3 * len(every)

    summary = (out / "summary.md").read_text()
    assert summary.startswith("Attack × method, undefended") and "| attack | " + " | ".join(columns) + " |" in summary
    assert all(f"| {name} | task_arithmetic | 0.3 |" in summary for name in every)
    assert "IBVS" in summary and all(f"| {name} | ties_sum | 0.3 |" in summary.split("IBVS")[1] for name in every)
    assert (out / "asr_ca_vs_coefficient.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"matrix/asr/none", "matrix/delta_ca/none", "matrix/asr/ibvs"} <= set(events.Tags()["images"])
    tags = events.Tags()["scalars"]
    assert "merge/task_arithmetic/attack_badmerging_ontask/asr" in tags
    steps = [e.step for e in events.Scalars("merge/task_arithmetic/attack_badmerging_ontask/asr")]
    assert steps == [30, 60]
    for t in TASKS:
        assert (out / "models" / f"{t}.safetensors").exists() and (out / "models" / f"{t}.json").exists()

    # A rerun reuses every cached fine-tune, trigger and attack.
    assert pipeline.main(argv[:5] + ["--coefficients", "0.3", "--methods", "ta", "--attacks", "badnets", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": cached ") == len(TASKS) + 1 + 2  # + the defender's IBVS pair
