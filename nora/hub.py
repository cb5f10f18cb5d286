"""Hugging Face Hub access (the client): a reachability probe that fails fast, and adapter download.

Without network, the hub client retries each request with back-off before falling back to its cache (about a
minute per file). :func:`go_offline_if_unreachable` probes the hub once, with huggingface_hub's own HTTP session
(so ``HTTPS_PROXY``/``HTTP_PROXY``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured exactly as for the real
downloads), and if it cannot be reached switches huggingface_hub, transformers and datasets to offline mode, so
cached files load at once and missing ones fail at once with a clear message.

:func:`download_adapter` fetches an adapter repository (``nora.app.adapters.resolve_adapter`` accepts a Hub id
wherever an adapter directory is expected); publishing a training run is :func:`nora.app.publish.push_to_hub`.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from nora.errors import MissingFileError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when huggingface_hub's session gets any HTTP answer from the endpoint within ``timeout`` seconds."""
    from huggingface_hub import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout, follow_redirects=False)
        return True
    except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout, proxy) means unreachable
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


def download_adapter(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """The local snapshot of the adapter repository ``repo_id`` (downloaded once, then from the HF cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; the user needs one line
        raise MissingFileError(
            f"adapter {repo_id!r} is neither a local directory nor downloadable from "
            f"{hub_endpoint()} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"where there is network: hf download {repo_id} --local-dir <dir>"
        ) from None
