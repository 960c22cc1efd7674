"""A reduced end-to-end run of the main job: results.json contract and the last printed line."""

import json

import pipeline


def test_quick_main_job_end_to_end(tmp_path, session_cache, capsys):
    out = tmp_path / "run"
    assert pipeline.main(["--quick", "--out_dir", str(out), "--cache_dir", session_cache, "--coefficients", "0.3", "0.6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    assert res["code_version"] and res["config"]["method"] == "task_arithmetic"
    rows = res["rows"]
    names = [r["merge"] for r in rows]
    assert names[:4] == ["individual", "zero-shot", "task_arithmetic", "task_arithmetic"]
    assert [r["coefficient"] for r in rows[:4]] == [None, None, 0.3, 0.6]
    # every method of the methods config, in the same table
    import yaml

    planned = [e["name"] for e in yaml.safe_load(open(pipeline.METHODS_CONFIG))["plan"]]
    assert names[4:] == planned
    for r in rows:
        assert set(r["clean_acc"]) == set(pipeline.DEFAULT_TASKS)
        assert r["attack"] == "none" and r["defense"] == "none" and r["asr"] is None
        assert isinstance(r["normalized_acc"], float)
    for t in pipeline.DEFAULT_TASKS:
        assert (out / "models" / f"{t}.safetensors").exists() and (out / "models" / f"{t}.json").exists()
    # a rerun reuses the cached fine-tunes
    assert pipeline.main(["--quick", "--out_dir", str(out), "--cache_dir", session_cache, "--coefficients", "0.3", "--methods", "ta"]) == 0
    assert capsys.readouterr().out.count("cached fine-tune") == len(pipeline.DEFAULT_TASKS)
