"""Shared fixtures. No test reaches the network: the hub is switched off for every test."""

import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def base():
    """The embedded base model (loaded once per test session)."""
    from modeling.clip import load_base_model

    return load_base_model()


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
