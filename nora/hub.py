"""Hugging Face Hub access: a reachability probe that fails fast, adapter upload with a model card, download.

Without network, the hub client retries each request with back-off before falling back to its cache (about a
minute per file). :func:`go_offline_if_unreachable` probes the hub once, with huggingface_hub's own HTTP session
(so ``HTTPS_PROXY``/``HTTP_PROXY``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured exactly as for the real
downloads), and if it cannot be reached switches huggingface_hub, transformers and datasets to offline mode, so
cached files load at once and missing ones fail at once with a clear message.

:func:`push_to_hub` uploads a training run's ``adapter/`` plus a generated model card (``README.md``);
:func:`download_adapter` fetches one back (``nora.runs.resolve_adapter`` accepts a Hub id wherever an adapter
directory is expected).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

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

    from nora.errors import MissingFileError

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; the user needs one line
        raise MissingFileError(f"adapter {repo_id!r} is neither a local directory nor downloadable from "
                               f"{hub_endpoint()} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"where there is network: hf download {repo_id} --local-dir <dir>") from None


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload ``<run_dir>/adapter/`` and a generated model card to the Hub repository ``repo_id`` (created if
    missing); returns the commit URL. Load it back with :func:`nora.runs.resolve_adapter` (any adapter loader),
    or evaluate it with lm_eval's ``nora`` model (``pretrained=<base>,adapter=<repo_id>``)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from nora.model_card import model_card
    from nora.runs import find_adapter_dir
    from nora.runs.layout import RunDir

    run_dir = Path(run_dir)
    adir = find_adapter_dir(run_dir)
    files = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
             for p in sorted(adir.iterdir()) if p.is_file() and p.name != "README.md"]
    files.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(run_dir, repo_id).encode()))
    config = RunDir(run_dir).config
    if config.exists():  # the run's full configuration, to rebuild the base model exactly
        files.append(CommitOperationAdd(path_in_repo="run_config.yaml", path_or_fileobj=str(config)))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(repo_id, operations=files, revision=revision,
                               commit_message=commit_message or f"nora adapter from {run_dir.name}")
    return str(commit.commit_url)
