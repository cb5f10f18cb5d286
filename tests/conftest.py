import logging
import os

import pytest
import torch

from nora.logs import ConsoleFormatter

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_distributed_env():
    """A test that leaves torchrun's variables behind makes every later in-process training run
    try to join a process group (and wait for it): fail the leaking test instead."""
    before = {k: os.environ.get(k) for k in _DIST_VARS}
    yield
    after = {k: os.environ.get(k) for k in _DIST_VARS}
    leaked = {k: v for k, v in after.items() if v != before[k]}
    for k in leaked:
        if before[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = before[k]
    assert not leaked, f"test left distributed environment variables behind: {leaked}"


@pytest.fixture
def logged(caplog):
    """nora's log messages as a command's console shows them (``nora.logs.ConsoleFormatter``: an INFO line as it is,
    ``warning: ...``); each call returns what was logged since the last one, like ``capsys.readouterr()``."""
    caplog.set_level(logging.INFO, logger="nora")
    formatter = ConsoleFormatter()

    def read() -> str:
        text = "".join(formatter.format(r) + "\n" for r in caplog.records)
        caplog.clear()
        return text

    return read


@pytest.fixture(scope="module")
def tok():
    """The offline tokenizer (nora.models.tokenizer) the instruction-data tests build their datasets with."""
    from nora.models.tokenizer import build_offline_tokenizer

    return build_offline_tokenizer()
