"""Sweeps (sweep.py on the experiment engine): a tiny grid end to end into one table; a rerun computes nothing; a
sweep killed with SIGKILL (then a torn line, then SIGUSR1) resumes to exactly the uninterrupted table; two
concurrent array tasks split the cells and their union is the local run.

The grid is the shipped smoke grid with one coefficient, the smallest training and data sizes of the other tests
and IBVS at one strength: 2 attacks × 2 methods × 2 defenses = 8 cells. The models are trained once, by the first
run, in the session cache; the later runs get a cache that holds those trainings but none of the cells'
evaluations, so their cells are measured again and must give the same numbers.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import experiments.nodes as nodes
import experiments.sweep as lib
import sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.synthetic_train_size", "64",
        "--data.synthetic_test_size", "16", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]
N_CELLS = 8


def _config(path: Path, out: Path, cache: str) -> str:
    cfg = yaml.safe_load((ROOT / "configs/sweep/embedded_smoke.yaml").read_text())
    cfg.update(out_dir=str(out), cache_dir=cache, train_args=TINY, trigger_args=TINY,
               evaluation={"synthetic_train_size": 64, "synthetic_test_size": 16, "val_max_examples": 16})
    cfg["grid"]["coefficients"] = [0.3]
    cfg["defenses"]["ibvs"]["strengths"] = [1.0]
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _cache_of_trainings(src: str, dst: Path) -> str:
    """A cache with ``src``'s trained models (hard links) and data (symlinks) but none of its evaluations."""
    dst.mkdir()
    for entry in Path(src).iterdir():
        if entry.name != "artifacts":
            (dst / entry.name).symlink_to(entry)
    for artifact in (Path(src) / "artifacts").iterdir():
        recipe = artifact / "recipe.json"
        if recipe.is_file() and json.loads(recipe.read_text())["node"] == "train":
            shutil.copytree(artifact, dst / "artifacts" / artifact.name, copy_function=os.link)
    return str(dst)


def _table(out: Path) -> dict:
    """cell key -> what must not depend on how the sweep ran: config hash, model keys, rows."""
    entries = [json.loads(line) for line in (out / lib.TABLE).read_text().splitlines()]  # every line parses
    assert len({e["cell"] for e in entries}) == len(entries)
    return {e["cell"]: (e["config_hash"], e["keys"], e["rows"]) for e in entries}


def _lines(out: Path) -> int:
    path = out / lib.TABLE
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _ran(output: str, kind: str) -> list[str]:
    """Node ids of ``kind`` the engine ran (it prints ``[engine] <id>: running (<key>)`` for each)."""
    return [line.split()[1].rstrip(":") for line in output.splitlines()
            if line.startswith(f"[engine] {kind}:") and ": running (" in line]


@pytest.fixture(scope="module")
def full(tmp_path_factory, session_cache):
    """The uninterrupted local run; its trained models are shared with the other tests."""
    root = tmp_path_factory.mktemp("sweep")
    config = _config(root / "sweep.yaml", root / "full", session_cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below (OMP_NUM_THREADS=1): the same numbers
    try:
        t0 = time.time()
        assert sweep.main(["--config", config]) == 0
        print(f"full run: {time.time() - t0:.1f}s")
    finally:
        torch.set_num_threads(threads)
    return root, config, root / "full", session_cache


def _sweep_process(config: str, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "sweep.py", "--config", config], cwd=ROOT, start_new_session=True,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", **env})


def _wait_for_lines(proc: subprocess.Popen, out: Path, more_than: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while _lines(out) <= more_than:
        assert proc.poll() is None, f"the sweep ended ({proc.returncode}) before writing a cell"
        assert time.time() < deadline, "no cell written in time"
        time.sleep(0.05)
    return _lines(out)


def test_tiny_grid_end_to_end(full):
    root, config, out, _ = full
    cfg = lib.load_config(config)
    cells = lib.cells(cfg)
    assert len(cells) == N_CELLS
    assert {c.coefficient for c in cells if c.method == "weight_average"} == {None}  # no λ: one cell per defense
    entries = [json.loads(line) for line in (out / lib.TABLE).read_text().splitlines()]
    assert [e["cell"] for e in entries] == [c.key for c in cells]
    for e, c in zip(entries, cells):
        assert (e["attack"], e["method"], e["coefficient"], e["defense"], e["seed"]) == \
            (c.attack, c.method, c.coefficient, c.defense, c.seed)
        assert len(e["config_hash"]) == 16 and e["config_hash"] == lib.cell_graph(cfg, c).key
        assert e["code_version"] and e["array_task"] == "0/1"
        labels = ["shapes", "digits"] if c.attack == "none" else ["attack_badmerging_ontask", "digits"]
        assert [Path(m).stem for m in e["models"]] == labels == list(e["keys"]) and all(map(os.path.isfile, e["models"]))
        assert e["keys"]["digits"] == entries[0]["keys"]["digits"]  # one training serves every cell of the seed
        rows = e["rows"]
        assert [r["merge"] for r in rows] == [c.method] * len(rows)
        assert all(r["coefficient"] == c.coefficient and set(r["clean_acc"]) == {"shapes", "digits"} for r in rows)
        assert rows[0]["attack"] is None and rows[0]["defense"] == "none" and rows[0]["normalized_acc"] is not None
        per_model = 1 if c.attack == "none" else 2  # the clean row, then the backdoored model's trigger on the merge
        assert len(rows) == per_model * (1 if c.defense == "none" else 2)
        for r in rows[per_model:]:  # the defense reaches the evaluation: IBVS at its one strength
            assert r["defense"] == "ibvs" and r["defense_alpha"] == 1.0 and r["defense_selected"] is True
        for r in rows[1:per_model] + rows[per_model + 1:]:
            assert r["attack"]["in_merge"] is True and r["attack"]["label"] == "attack_badmerging_ontask"
            assert 0 <= r["asr"] <= 1 and r["asr_total"] > 0
    with open(out / lib.CSV) as f:
        table = list(csv.DictReader(f))
    assert len(table) == sum(len(e["rows"]) for e in entries)
    assert {r["cell"] for r in table} == {c.key for c in cells}
    assert all(r["config_hash"] and r["code_version"] and r["defense"] for r in table)
    saved = yaml.safe_load((out / lib.CONFIG_COPY).read_text())
    assert saved["grid"] == cfg.grid and saved["defenses"]["ibvs"]["strengths"] == [1.0] and saved["code_version"]


def test_rerun_computes_nothing(full, monkeypatch, capsys):
    root, config, out, _ = full
    before = {p: (out / p).read_bytes() for p in (lib.TABLE, lib.CSV)}

    def forbidden(*args):
        raise AssertionError("a rerun must not train or merge")

    for kind in ("train", "vector", "evaluate"):
        monkeypatch.setitem(nodes.RUNNERS, kind, forbidden)
    assert sweep.main(["--config", config]) == 0
    assert f"{N_CELLS} already in" in capsys.readouterr().out
    assert {p: (out / p).read_bytes() for p in before} == before
    assert sweep.main(["--config", config, "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == N_CELLS and all(line.split("\t")[2] == "done" for line in listed)


def test_interrupted_sweep_resumes_to_the_uninterrupted_table(full, tmp_path, capsys):
    root, _, full_out, cache = full
    out = tmp_path / "out"
    config = _config(tmp_path / "sweep.yaml", out, _cache_of_trainings(cache, tmp_path / "cache"))

    # 1. SIGKILL as soon as the first cell is in the table: no partial line, the other cells missing.
    proc = _sweep_process(config, tmp_path / "killed")
    try:
        _wait_for_lines(proc, out, 0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = _table(out)
    assert 1 <= len(killed) < N_CELLS
    assert (out / lib.TABLE).read_bytes().endswith(b"\n")

    # 2. A line torn by a crash mid-write (power loss): the next append cuts it off.
    with open(out / lib.TABLE, "ab") as f:
        f.write(b'{"cell": "attack=none,method=task_arithm')

    # 3. SIGUSR1 (SLURM's warning before the time limit): stops at once, after whole cells only.
    proc = _sweep_process(config, tmp_path / "usr1")
    try:
        _wait_for_lines(proc, out, len(killed))
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 128 + signal.SIGUSR1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "stopping; rerun the same command to resume" in (tmp_path / "usr1.err").read_text()
    stopped = _table(out)
    assert len(killed) < len(stopped) < N_CELLS and set(killed) < set(stopped)

    # 4. Resume: nothing is trained, only missing cells are evaluated (one may have been published by the stopped
    # run just before its table line), and the table equals the uninterrupted one.
    capsys.readouterr()
    assert sweep.main(["--config", config]) == 0
    output = capsys.readouterr().out
    assert _ran(output, "train") == [] and _ran(output, "vector") == []
    cfg = lib.load_config(config)
    missing = {lib.cell_graph(cfg, c).evaluation.id for c in lib.cells(cfg) if c.key not in stopped}
    evaluated = _ran(output, "evaluate")
    assert set(evaluated) <= missing and len(evaluated) >= len(missing) - 1
    assert _table(out) == _table(full_out)
    with open(out / lib.CSV) as f, open(full_out / lib.CSV) as g:
        assert sorted(r["cell"] for r in csv.DictReader(f)) == sorted(r["cell"] for r in csv.DictReader(g))


def test_array_tasks_split_the_cells_and_their_union_is_the_local_run(full, tmp_path):
    root, _, full_out, cache = full
    out = tmp_path / "out"
    config = _config(tmp_path / "sweep.yaml", out, _cache_of_trainings(cache, tmp_path / "cache"))
    # two array tasks at once on one table: one told by flags, one by SLURM's variables
    first = subprocess.Popen([sys.executable, "sweep.py", "--config", config, "--array_index", "0", "--array_count", "2"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "a0.err", "w"),
                             env={**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"})
    second = _sweep_process(config, tmp_path / "a1", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    try:
        assert first.wait(timeout=600) == 0, (tmp_path / "a0.err").read_text()[-2000:]
        assert second.wait(timeout=600) == 0, (tmp_path / "a1.err").read_text()[-2000:]
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "(array task 1 of 2: 4 cells); 0 already in" in (tmp_path / "a1.out").read_text()
    entries = [json.loads(line) for line in (out / lib.TABLE).read_text().splitlines()]
    index = {c.key: c.index for c in lib.cells(lib.load_config(config))}
    assert len(entries) == N_CELLS
    for e in entries:
        assert e["array_task"] == f"{index[e['cell']] % 2}/2"
    assert _table(out) == _table(full_out)


def test_cli_settings_print_config_and_one_line_errors(tmp_path, capsys):
    config = _config(tmp_path / "sweep.yaml", tmp_path / "out", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        sweep.main(["--config", config, "--tasks", "shapes", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tasks"] == ["shapes"] and printed["grid"]["attacks"] == ["none", "badmerging_ontask"]
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))  # reusable as --config
    assert sweep.main(["--config", str(tmp_path / "printed.yaml"), "--grid", '{"attacks": [none], "methods": '
                       '[task_arithmetic], "coefficients": [0.3]}', "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("attack=none,method=task_arithmetic,coefficient=0.3,"
                                                            "defense=none,seed=0")
    for argv, message in ((["--config", config, "--bogus", "1"], "unknown option or config key 'bogus'"),
                          (["--config", config, "--tasks", "shapes", "sun397"], "tasks: 'sun397' is not a task of the spec"),
                          (["--config", config, "--evaluation", "{batch_sise: 4}"], "unknown key 'batch_sise' under "
                                                                                    "evaluation")):
        assert sweep.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sweep.py: error: ") and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
