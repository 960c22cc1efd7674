"""Shared fixtures. No test reaches the network: the hub is switched off for every test."""

import os
import re
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning  # noqa: E402, F401  (its stderr handler, made on import, must hold the real stderr, not a test's capsys)
import pytest  # noqa: E402
import torch  # noqa: E402

_PROGRESS = re.compile(r"\d+%\||it/s|s/it|examples/s")  # tqdm bars share stderr; they are not messages
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WARNING = re.compile(r"^\S+\.py:\d+: |warning", re.I)  # Python / Lightning warnings: not messages either


@pytest.fixture
def one_error_line(capsys):
    """``read(prog)``: the one line ``<prog>: error: ...`` on stderr since the last read, asserting it is the only
    message (progress bars and warnings aside) and that no traceback was printed; ``read(prog, "interrupted")``
    for the Ctrl-C line ``<prog>: interrupted; ...``."""

    def read(prog: str, kind: str = "error") -> str:
        err = capsys.readouterr().err
        lines = [_ANSI.sub("", line) for line in re.split(r"[\r\n]", err)]  # tqdm's cursor moves are not text
        lines = [line for line in lines if line.strip() and not _WARNING.search(line) and not _PROGRESS.search(line)]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"{prog}: {kind}{': ' if kind == 'error' else '; '}"), err
        assert "Traceback" not in err, err
        return lines[0]

    return read


@pytest.fixture(scope="session")
def base():
    """The embedded base model (loaded once per test session)."""
    from modeling.clip import load_base_model

    return load_base_model()


def export_models(root, base, edit=None) -> list:
    """Two exported encoders, shapes and digits (θ_pre plus small random task vectors, seeds 0 and 1), with full
    metadata, as train.py writes them, in ``root``; ``edit(i, state)`` may change model i's weights first."""
    from merging.io import save_state_dict

    theta_pre = base.encoder_state_dict()
    paths = []
    for i, task in enumerate(("shapes", "digits")):
        gen = torch.Generator().manual_seed(i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in theta_pre.items()}
        if edit is not None:
            edit(i, sd)
        path = root / f"{task}.safetensors"
        save_state_dict(path, sd, {"kind": "finetune", "task": task, "base_model": base.describe(), "attack": None})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory, base):
    """``export_models`` in a fresh folder."""
    return export_models(tmp_path_factory.mktemp("models"), base)


@pytest.fixture
def task_registry_restored(monkeypatch):
    """The task registry, the loaded task files and BADMERGING_TASKS_FILES (unset here) as they were before the test."""
    from datamodules import task_files, tasks

    monkeypatch.delenv(tasks.TASKS_FILES_ENV, raising=False)  # monkeypatch restores the variable afterwards
    saved = dict(tasks.TASKS), dict(task_files._FILES), dict(task_files._OWNER), tasks._ENVIRONMENT_ERROR
    yield
    for live, old in zip((tasks.TASKS, task_files._FILES, task_files._OWNER), saved[:3]):
        live.clear()
        live.update(old)
    tasks._ENVIRONMENT_ERROR = saved[3]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """A cache dir shared by the tests that render small synthetic tasks."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the test models are tiny, and on a busy 2-core machine two threads
    contend at every OpenMP barrier (measured ~30x slower on the embedded model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def slurm():
    """Start (installing if needed) the local SLURM; skip with the script's reason where it cannot run."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("SLURM cannot be started here: the local slurmctld/slurmd need root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM cannot be installed here: slurm-wlm is missing and there is no apt-get")
    script = Path(__file__).resolve().parents[1] / "scripts/slurm/start_local_slurm.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"SLURM cannot be installed or started here: {done.stderr.strip().splitlines()[-1:]}")
