"""Sweeps (sweep.py): a tiny grid end to end into one table; a rerun computes nothing; a sweep killed with SIGKILL
(then a torn line, then SIGUSR1) resumes to exactly the uninterrupted table; two concurrent array tasks split the
cells and their union is the local run.

The grid is the shipped smoke grid (configs/sweep/embedded_smoke.yaml) with one coefficient and the smallest
training and data sizes of the other tests: 2 attacks × 2 methods × 2 defense presets = 8 cells. The models are
trained once, by the first run, and shared with the later runs through ``train_dir``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import pipeline
import sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.synthetic_train_size", "64",
        "--data.synthetic_test_size", "16", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]
N_CELLS = 8


def _config(path: Path, out: Path, cache: str, train_dir: Path | None = None) -> str:
    cfg = yaml.safe_load((ROOT / "configs/sweep/embedded_smoke.yaml").read_text())
    cfg.update(out_dir=str(out), cache_dir=cache, train_args=TINY, trigger_args=TINY,
               merge_args=["--synthetic_train_size", "64", "--synthetic_test_size", "16"])
    cfg["grid"]["coefficients"] = [0.3]
    if train_dir is not None:
        cfg["train_dir"] = str(train_dir)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _table(out: Path) -> dict:
    """cell key -> what must not depend on how the sweep ran: config hash, models, rows."""
    entries = [json.loads(line) for line in (out / sweep.TABLE).read_text().splitlines()]  # every line parses
    assert len({e["cell"] for e in entries}) == len(entries)
    return {e["cell"]: (e["config_hash"], e["models"], e["rows"]) for e in entries}


def _lines(out: Path) -> int:
    path = out / sweep.TABLE
    return path.read_bytes().count(b"\n") if path.exists() else 0


class Counter:
    """Wraps pipeline.merge_job: the cells merged (their out_dir names)."""

    def __init__(self, monkeypatch):
        self.cells, real = [], pipeline.merge_job

        def counted(scenario, args):
            self.cells.append(Path(args[args.index("--out_dir") + 1]).name)
            return real(scenario, args)

        monkeypatch.setattr(pipeline, "merge_job", counted)


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
    cfg = sweep.load_config(config)
    cells = sweep.cells(cfg)
    assert len(cells) == N_CELLS
    assert {c.coefficient for c in cells if c.method == "weight_average"} == {None}  # no λ: one cell per preset
    entries = [json.loads(line) for line in (out / sweep.TABLE).read_text().splitlines()]
    assert [e["cell"] for e in entries] == [c.key for c in cells]
    for e, c in zip(entries, cells):
        assert (e["attack"], e["method"], e["coefficient"], e["defense"], e["seed"]) == \
            (c.attack, c.method, c.coefficient, c.defense, c.seed)
        assert len(e["config_hash"]) == 16 and e["config_hash"] == sweep.config_hash(sweep.recipe(cfg, c))
        assert e["code_version"] and e["array_task"] == "0/1"
        names = [Path(m).stem for m in e["models"]]
        assert names == (["shapes_seed0", "digits_seed0"] if c.attack == "none"
                         else ["attack_badmerging_ontask_seed0", "digits_seed0"])
        rows = e["rows"]
        assert [r["merge"] for r in rows] == [c.method] * len(rows)
        assert all(r["coefficient"] == c.coefficient and set(r["clean_acc"]) == {"shapes", "digits"} for r in rows)
        assert rows[0]["attack"] == "none" and rows[0]["normalized_acc"] is not None
        if c.attack == "none":
            assert len(rows) == 1
        else:  # the backdoored model's trigger, measured on the merge
            assert len(rows) == 2 and rows[1]["attack"]["in_merge"] is True
            assert rows[1]["attack"]["label"] == "attack_badmerging_ontask_seed0"
            assert 0 <= rows[1]["asr"] <= 1 and rows[1]["asr_total"] > 0
        # the defense preset's arguments reach merge.py (here: the streaming engine)
        merged = json.loads((out / "cells" / c.dirname / "results.json").read_text())
        assert merged["config"]["engine"] == ("streaming" if c.defense == "none_streaming" else "auto")
    with open(out / sweep.CSV) as f:
        table = list(csv.DictReader(f))
    assert len(table) == sum(len(e["rows"]) for e in entries)
    assert {r["cell"] for r in table} == {c.key for c in cells}
    assert all(r["config_hash"] and r["code_version"] and r["defense"] for r in table)
    saved = yaml.safe_load((out / sweep.CONFIG_COPY).read_text())
    assert saved["grid"] == cfg["grid"] and saved["defenses"] == cfg["defenses"] and saved["code_version"]


def test_rerun_computes_nothing(full, monkeypatch, capsys):
    root, config, out, _ = full
    before = {p: (out / p).read_bytes() for p in (sweep.TABLE, sweep.CSV)}

    def forbidden(*args):
        raise AssertionError("a rerun must not train or merge")

    monkeypatch.setattr(pipeline, "train_job", forbidden)
    monkeypatch.setattr(pipeline, "merge_job", forbidden)
    assert sweep.main(["--config", config]) == 0
    assert f"{N_CELLS} already in" in capsys.readouterr().out
    assert {p: (out / p).read_bytes() for p in before} == before
    assert sweep.main(["--config", config, "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == N_CELLS and all(line.split("\t")[2] == "done" for line in listed)


def test_interrupted_sweep_resumes_to_the_uninterrupted_table(full, tmp_path, monkeypatch, capsys):
    root, _, full_out, cache = full
    out = tmp_path / "out"
    config = _config(tmp_path / "sweep.yaml", out, cache, train_dir=full_out)

    # 1. SIGKILL as soon as the first cell is in the table: no partial line, the other cells missing.
    proc = _sweep_process(config, tmp_path / "killed")
    try:
        _wait_for_lines(proc, out, 0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = _table(out)
    assert 1 <= len(killed) < N_CELLS
    assert (out / sweep.TABLE).read_bytes().endswith(b"\n")

    # 2. A line torn by a crash mid-write (power loss): the next append cuts it off.
    with open(out / sweep.TABLE, "ab") as f:
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

    # 4. Resume: only the missing cells are merged, nothing is trained, and the table equals the uninterrupted one.
    counter = Counter(monkeypatch)
    capsys.readouterr()
    assert sweep.main(["--config", config]) == 0
    assert ": training" not in capsys.readouterr().out
    done = {c.dirname for c in sweep.cells(sweep.load_config(config)) if c.key in stopped}
    assert len(counter.cells) == N_CELLS - len(stopped) and not done & set(counter.cells)
    assert _table(out) == _table(full_out)
    with open(out / sweep.CSV) as f, open(full_out / sweep.CSV) as g:
        assert sorted(r["cell"] for r in csv.DictReader(f)) == sorted(r["cell"] for r in csv.DictReader(g))


def test_array_tasks_split_the_cells_and_their_union_is_the_local_run(full, tmp_path):
    root, _, full_out, cache = full
    out = tmp_path / "out"
    config = _config(tmp_path / "sweep.yaml", out, cache, train_dir=full_out)
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
    entries = [json.loads(line) for line in (out / sweep.TABLE).read_text().splitlines()]
    index = {c.key: c.index for c in sweep.cells(sweep.load_config(config))}
    assert len(entries) == N_CELLS
    for e in entries:
        assert e["array_task"] == f"{index[e['cell']] % 2}/2"
    assert _table(out) == _table(full_out)
