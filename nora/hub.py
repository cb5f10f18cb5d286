"""Hugging Face hub access without long hangs on machines with no network.

Without network, the hub client retries each request with back-off before falling back to its
cache (about a minute per file). :func:`go_offline_if_unreachable` probes the hub once (a TCP
connect with a short timeout) and, if it cannot be reached, switches huggingface_hub, transformers
and datasets to offline mode, so cached files load at once and missing ones fail at once with a
clear message.
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def go_offline_if_unreachable() -> bool:
    """Switch the HF libraries to offline mode if the hub cannot be reached. Returns True if offline."""
    if offline():
        return True
    if hub_reachable():
        return False
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config as dcfg

        dcfg.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass
    return True
