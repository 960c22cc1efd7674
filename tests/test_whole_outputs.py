"""Outputs whole or absent: a results folder, or weights with their sidecar, is the old complete set or the new one
after a failure or a SIGKILL between any two writes; a second writer is refused with one line; what a killed run
left (staging folders, temp files, its lock) is gone after the next run. And two noisy paths: an output under a
kernel pseudo filesystem, and a FIFO or a device given as a model."""

import csv
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import merge
from evaluation import rows as rows_module
from evaluation.rows import OutputSnapshot, write_results
from merging.io import (MergeInputError, OutputBusyError, SafetensorsReader, check_output_path, claim_outputs,
                        file_problem, load_metadata, load_state_dict, read_header_metadata, save_state_dict)


# -- helpers -----------------------------------------------------------------------------------------------------------
def _rows(tag: int, n: int) -> list[dict]:
    return [{"merge": f"m{tag}", "coefficient": 0.3, "attack": None, "defense": "none", "clean_acc": {"shapes": tag / 10},
             "mean_clean_acc": tag / 10, "normalized_acc": None, "asr": None} for _ in range(n)]


def _write(out: Path, tag: int, n: int) -> None:
    write_results(out, {"writer": tag}, _rows(tag, n), ["shapes"])


def _results(out: Path) -> tuple[int, int] | None:
    """(writer, number of rows) of the results set in ``out``; None when there is none; fails on any mix."""
    json_path, csv_path = out / "results.json", out / "results.csv"
    if not json_path.exists() and not csv_path.exists():
        return None
    payload = json.loads(json_path.read_text())
    lines = list(csv.reader(io.StringIO(csv_path.read_text())))
    writer = payload["config"]["writer"]
    assert len(lines) - 1 == len(payload["rows"]), "the JSON of one run beside the CSV of another"
    assert {line[0] for line in lines[1:]} == {r["merge"] for r in payload["rows"]} == {f"m{writer}"}
    return writer, len(payload["rows"])


def _pair(path: Path) -> int | None:
    """The writer of the weights at ``path`` and of their sidecar (always the same one); None when there are none."""
    sidecar = path.with_suffix(".json")
    if not path.exists():
        assert not sidecar.exists(), "a sidecar without its weights"
        return None
    writer = int(load_state_dict(path)["w"][0])
    assert load_metadata(path) == read_header_metadata(path) == {"writer": writer}, "weights beside another's sidecar"
    return writer


def _stray(root: Path) -> list[str]:
    """Hidden entries (staging folders, temp files, locks) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


class _FailAt:
    """``os.replace`` / ``os.rename`` / ``os.link`` that fail (or SIGKILL this process) at call number ``k``."""

    def __init__(self, setattr_, k: int, kill: bool = False):
        self.k, self.calls, self.kill = k, 0, kill
        for name in ("replace", "rename", "link"):
            setattr_(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def op(*args, **kwargs):
            self.calls += 1
            if self.calls == self.k:
                if self.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(5, "injected I/O error")
            return real(*args, **kwargs)
        return op


def _killed_child(body) -> None:
    """Run ``body`` in a forked child that must die of SIGKILL (``body`` arranges it)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            body()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _recover(target: Path, is_dir: bool = True) -> None:
    """What the next run does first: claim ``target`` (finishing or dropping a killed writer's commit), let go."""
    claim_outputs(target, None, is_dir=is_dir).release()


# -- a failure at any write: the old set or the new one, at once -------------------------------------------------------
def _cut_at_every_write(monkeypatch, make, check) -> int:
    """``make(k)`` -> a write; run it failing at its k-th rename or link, for every k it has; ``check(k, failed)``
    after each. Returns how many renames and links the write makes."""
    write = make(0)
    with monkeypatch.context() as m:
        counter = _FailAt(m.setattr, 0)  # k=0: count only
        write()
    for k in range(1, counter.calls + 1):
        write = make(k)
        with monkeypatch.context() as m:
            _FailAt(m.setattr, k)
            try:
                write()
                failed = False
            except OSError as e:
                assert "injected" in str(e)
                failed = True
        check(k, failed)
    return counter.calls


@pytest.mark.parametrize("fresh", [False, True], ids=["existing out_dir", "fresh out_dir"])
def test_a_failure_at_any_write_leaves_the_old_or_the_new_results(tmp_path, monkeypatch, fresh):
    def make(k):
        out = tmp_path / f"k{k}" / "out"
        if not fresh:
            _write(out, 1, 3)
        return lambda: _write(out, 2, 5)

    def check(k, failed):
        out = tmp_path / f"k{k}" / "out"
        assert _results(out) == ((None if fresh else (1, 3)) if failed else (2, 5)), k
        if fresh and failed:
            assert not out.exists()  # never an empty or half-filled out_dir
        assert _stray(out.parent) == []  # rolled back on the spot: no staging folder, lock or temp file
        _write(out, 3, 7)  # the next run
        assert _results(out) == (3, 7) and _stray(out.parent) == []

    # the journal, then (link aside + replace) per file, or the one rename of a fresh folder
    assert _cut_at_every_write(monkeypatch, make, check) == (2 if fresh else 5)


@pytest.mark.parametrize("metadata", [True, False], ids=["with metadata", "without"])
def test_a_failure_at_any_write_leaves_the_old_or_the_new_export(tmp_path, monkeypatch, metadata):
    def make(k):
        path = tmp_path / f"k{k}" / "m.safetensors"
        save_state_dict(path, {"w": torch.full((4,), 1.0)}, {"writer": 1})
        return lambda: save_state_dict(path, {"w": torch.full((4,), 2.0)}, {"writer": 2} if metadata else None)

    def check(k, failed):
        path = tmp_path / f"k{k}" / "m.safetensors"
        if failed:
            assert _pair(path) == 1, k
        elif metadata:
            assert _pair(path) == 2, k
        else:  # weights without metadata: no stale sidecar left to describe them
            assert int(load_state_dict(path)["w"][0]) == 2 and not path.with_suffix(".json").exists()
        assert _stray(path.parent) == []

    assert _cut_at_every_write(monkeypatch, make, check) == (5 if metadata else 4)  # journal, then per file


# -- a real SIGKILL between any two writes: the next run finds the old set or the new one ------------------------------
@pytest.mark.parametrize("fresh", [False, True], ids=["existing out_dir", "fresh out_dir"])
def test_sigkill_between_any_two_writes_then_the_next_run_recovers(tmp_path, fresh):
    calls = 5 if not fresh else 2  # journal, then (link + replace) per file, or one folder rename
    for k in range(calls + 1):
        out = tmp_path / f"k{k}" / "out"
        if not fresh:
            _write(out, 1, 3)

        def run(k=k, out=out):
            if k == 0:  # killed while staging: after the CSV, before the JSON is written
                real = rows_module.json.dumps
                rows_module.json.dumps = lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL) or real(*a, **kw)
            else:
                _FailAt(lambda obj, name, value: setattr(obj, name, value), k, kill=True)
            _write(out, 2, 5)

        _killed_child(run)
        if fresh:  # a killed fresh run never leaves an empty or partial out_dir
            assert not out.exists()
        else:
            assert (out / "results.json").exists() and (out / "results.csv").exists()
        assert _stray(out.parent)  # what the killed run left: staging folder, lock file
        _recover(out)
        committed = k >= 2  # the journal (the first rename) was written: the commit is finished
        assert _results(out) == ((2, 5) if committed else (None if fresh else (1, 3)))
        assert _stray(out.parent) == []
        _write(out, 3, 7)
        assert _results(out) == (3, 7) and _stray(out.parent) == []


def test_sigkill_while_exporting_never_leaves_weights_without_their_sidecar(tmp_path):
    for fresh in (False, True):
        for k in range(1, 4):  # journal, then link + replace of the sidecar (its weights come last)
            path = tmp_path / f"{fresh}-{k}" / "m.safetensors"
            if not fresh:
                save_state_dict(path, {"w": torch.full((4,), 1.0)}, {"writer": 1})

            def run(k=k, path=path):
                _FailAt(lambda obj, name, value: setattr(obj, name, value), k, kill=True)
                save_state_dict(path, {"w": torch.full((4,), 2.0)}, {"writer": 2})

            _killed_child(run)
            if path.exists():
                assert path.with_suffix(".json").exists()
            _recover(path, is_dir=False)  # the next export of this path starts with this
            assert _pair(path) == (2 if k >= 2 else (None if fresh else 1))
            assert _stray(path.parent) == []


# -- one writer at a time ----------------------------------------------------------------------------------------------
def _holder(out: Path) -> tuple[int, int]:
    """A forked process holding the claim on ``out`` until killed: (pid, read end it signalled on)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            claim = claim_outputs(out)
            os.write(w, b"1")
            signal.pause()
            claim.release()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    return pid


def test_a_second_merge_into_a_busy_out_dir_is_refused_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    pid = _holder(out)
    try:
        # refused before any work: the models are not even read
        assert merge.main(["--models", "a.safetensors", "b.safetensors", "--out_dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [(f"merge.py: error: --out_dir {out} is being written by another run (pid {pid}); wait for it "
                        "or pass another --out_dir")]
        with pytest.raises(OutputBusyError, match=rf"\(pid {pid}\)"):
            OutputSnapshot.take(out, None)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _write(out, 2, 4)  # the holder died: its lock went with it, and its lock file goes with the next run
    assert _results(out) == (2, 4) and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_second_pipeline_into_a_busy_out_dir_is_refused_before_any_work(tmp_path, capsys):
    import pipeline

    out, cache = tmp_path / "out", tmp_path / "cache"
    pid = _holder(out)
    try:
        assert pipeline.main(["--quick", "--out_dir", str(out), "--cache_dir", str(cache)]) == 2
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"pipeline.py: error: --out_dir {out} is being written by another run (pid {pid}); wait for it or "
                    "pass another --out_dir")]
    assert not cache.exists() and not out.exists()  # nothing trained, nothing written


def test_two_writers_with_different_row_counts_never_mix(tmp_path):
    """Two processes rewrite one folder with 3 and 150 rows; every read under the claim finds one whole set."""
    out = tmp_path / "out"
    children = []
    for tag, n in ((1, 3), (2, 150)):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(25):
                    _write(out, tag, n)
                os._exit(0)
            except BaseException:
                os._exit(3)
        children.append(pid)
    seen, status = set(), {}
    while len(status) < len(children):
        with claim_outputs(out, wait=60):
            state = _results(out)
        if state is not None:
            assert state in ((1, 3), (2, 150))
            seen.add(state)
        for pid in children:
            if pid not in status:
                done, code = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = code
    assert all(os.WIFEXITED(code) and os.WEXITSTATUS(code) == 0 for code in status.values()), status
    assert _results(out) in ((1, 3), (2, 150)) and seen
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["results.csv", "results.json"]


# -- what a killed run left is cleaned at the next run -----------------------------------------------------------------
def test_stale_staging_folders_temp_files_and_locks_are_cleaned_at_the_next_run(tmp_path):
    out = tmp_path / "out"
    _write(out, 1, 2)
    dead = tmp_path / ".out.tmp-999999999-dead"  # a staging folder without journal: its run died before committing
    (dead / "new").mkdir(parents=True)
    (dead / "new" / "results.json").write_text("{half")
    (tmp_path / ".out.lock").write_text("999999999\n")  # the lock file of a killed run (its lock went with it)
    (out / ".results.json.tmp999999999").write_text("{half")  # temp files of the writers before whole sets
    (out / ".results.csv.tmp999999999").write_text("merge")
    (out / "notes.txt").write_text("mine")  # not one of the outputs: kept
    _write(out, 2, 4)
    assert _results(out) == (2, 4) and _stray(tmp_path) == []
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_merge_into_a_new_folder_leaves_nothing(tmp_path):
    """The claim made the parent folders for its lock; a refused run removes them and the lock again."""
    out = tmp_path / "a" / "b" / "out"
    snapshot = OutputSnapshot.take(out, None)
    assert (tmp_path / "a" / "b" / ".out.lock").exists()
    snapshot.remove_partial_outputs()
    assert os.listdir(tmp_path) == []


# -- noisy paths -------------------------------------------------------------------------------------------------------
def _mounted(point: str, fstype: str) -> bool:
    try:
        return any(line.split()[1:3] == [point, fstype] for line in open("/proc/self/mounts"))
    except OSError:
        return False


@pytest.mark.parametrize("root,fstype", [("/proc", "proc"), ("/sys", "sysfs")])
def test_out_dir_on_a_kernel_pseudo_filesystem_is_one_line_naming_the_flag(root, fstype, capsys):
    if not _mounted(root, fstype):
        pytest.skip(f"{root} is not a {fstype} mount here")
    out = f"{root}/badmerging_out/run"
    with pytest.raises(MergeInputError, match=rf"^--out_dir {out} is under {root}, a {fstype} kernel pseudo filesystem "
                                              r"that holds no files; pass another --out_dir on a disk, e\.g\. outputs/run$"):
        check_output_path(out, "--out_dir", is_dir=True)
    assert merge.main(["--models", "a.safetensors", "b.safetensors", "--out_dir", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"merge.py: error: --out_dir {out} is under {root}") and "Errno" not in err[0]


def _within(seconds: int, fn):
    """``fn()``, or TimeoutError if it blocks (as opening a FIFO for reading does until a writer comes)."""
    def blocked(*_):
        raise TimeoutError("blocked reading a FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_or_a_device_as_a_model_is_not_a_regular_file_and_never_blocks(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    assert file_problem(fifo) == "is a FIFO (named pipe), not a regular file"
    assert file_problem(tmp_path / "nope.safetensors") == "does not exist"
    assert file_problem(tmp_path) == "is a directory"
    for read in (SafetensorsReader, load_state_dict, read_header_metadata):
        with pytest.raises(MergeInputError, match=r"model\.safetensors: is a FIFO \(named pipe\), not a regular file; "
                                                  r"pass a \.safetensors file"):
            _within(10, lambda read=read: read(fifo))
    if os.path.exists("/dev/zero"):
        assert file_problem("/dev/zero") == "is a character device, not a regular file"
        with pytest.raises(MergeInputError, match=r"^/dev/zero: is a character device, not a regular file"):
            _within(10, lambda: SafetensorsReader("/dev/zero"))
    with pytest.raises(MergeInputError, match="nope.safetensors: file not found"):
        SafetensorsReader(tmp_path / "nope.safetensors")


# -- the pipeline's out_dir: one set too -------------------------------------------------------------------------------
def test_pipeline_out_dir_is_written_whole_killed_or_replaced(tmp_path, capsys):
    """A pipeline SIGKILLed mid-run leaves no out_dir; the next run writes the whole set (models, spec, summary,
    figure, results); a run with fewer outputs replaces it, the older run's summary and figure gone with it."""
    import subprocess
    import sys
    import time

    import pipeline

    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--quick", "--defense", "none", "--methods", "ta", "--coefficients", "0.3", "--cache_dir", str(cache),
              "--out_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "pipeline.py", *common, "--attacks", "badnets"], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.tmp-*/new/spec.yaml")):  # staged: the run is under way
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.1)
    child.kill()
    child.wait()
    assert not out.exists()  # killed mid-run: no out_dir, not an empty or partial one

    assert pipeline.main([*common, "--attacks", "badnets"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "results.json")
    assert {"spec.yaml", "models", "summary.md", "asr_ca_vs_coefficient.png", "results.csv", "results.json"} <= set(
        os.listdir(out))
    config = json.loads((out / "results.json").read_text())["config"]
    paths = [*config["attack_models"].values(), *config["clean_models"].values()]
    assert all(Path(p).parent == out / "models" and Path(p).is_file() for p in paths)  # the committed paths
    assert [s for s in _stray(tmp_path) if not s.startswith("cache")] == []  # staging, lock: gone

    assert pipeline.main([*common, "--attacks", "none"]) == 0
    assert sorted(os.listdir(out)) == ["models", "results.csv", "results.json", "spec.yaml"]
    assert not (out / "models" / "attack_badnets.safetensors").exists()
    assert [s for s in _stray(tmp_path) if not s.startswith("cache")] == []
