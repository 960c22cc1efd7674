"""Shared fixtures. No test reaches the network: the hub is switched off for every test."""

import os

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
