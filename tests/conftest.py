import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Never reach a hub from tests; everything they use is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no crash reports to a server either


@pytest.fixture(autouse=True)
def _small_torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def private_runtime_dir(monkeypatch):
    """A socket folder of its own for the live peers of one test, which must leave nothing in it."""
    folder = Path(tempfile.mkdtemp(prefix="n0-"))  # short: unix socket paths are limited to 107 characters
    monkeypatch.setenv("NODE0SIM_RUNTIME_DIR", str(folder))
    yield folder
    leftovers = list(folder.glob("*"))
    shutil.rmtree(folder, ignore_errors=True)
    assert not leftovers, "a node left its socket folder behind"
