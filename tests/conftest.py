import os

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
