"""Publishing a training run on the Hugging Face Hub: :func:`push_to_hub` uploads ``<run>/adapter/``, the run config
and a model card (``README.md``: method, base model, data, parameters, metrics and how to load it, written by
:func:`model_card` from the run's ``config.yaml``, ``summary.json``, ``mmlu.json`` and adapter files;
huggingface_hub's ``ModelCard``/``ModelCardData`` write the YAML metadata block the Hub reads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from nora.app.adapters import adapter_identity, adapter_mismatch, find_adapter_dir
from nora.app.reload import read_run_config
from nora.errors import UserError
from nora.files import read_json
from nora.runs.layout import RunDir, read_summary

# the one loader of every adapter kind; the note says what peft's own loader does with it
LOAD_NOTE = {
    "nora++": "LoRA + NoRA, one peft adapter: peft.PeftModel.from_pretrained loads it after `import nora`",
    "nora": "NoRA activations (and a new head, if any), one peft adapter: peft.PeftModel.from_pretrained loads it "
    "after `import nora`, nora.load_nora without peft",
    "trainable": "every trained tensor by parameter name",
}


def _base_model(cfg) -> str:
    m = cfg.model
    return str(m.get("hf_name") or m.get("path") or m.get("name"))


def _metrics(run_dir: Path, summary: dict | None) -> list[str]:
    lines = []
    if summary:
        for key in ("final", "best"):
            value = summary.get(key)
            if value:
                lines.append(f"| {key} ({summary.get('metric', 'metric')}) | {json.dumps(value)} |")
    mmlu = read_json(RunDir(run_dir).mmlu)
    if isinstance(mmlu, dict):
        overall = mmlu.get("overall", {})
        lines.append(f"| MMLU {overall.get('n', '?')} questions | accuracy {overall.get('accuracy')} |")
    return ["| metric | value |", "|---|---|", *lines] if lines else ["No metrics were recorded for this run."]


def _parameters(summary: dict | None) -> str:
    params = (summary or {}).get("parameters")
    if not params:
        return "not recorded"
    parts = ", ".join(f"{k} {v:,}" for k, v in params.get("components", {}).items() if v)
    return f"trainable {params['trainable']:,} of {params['total']:,} ({params.get('percent', 0):.3f}%): {parts}"


def model_card(run_dir: str | os.PathLike, repo_id: str) -> str:
    """The card text for the adapter of ``run_dir`` published as ``repo_id``."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    summary = read_summary(run_dir)
    ident = adapter_identity(find_adapter_dir(run_dir))
    base = _base_model(cfg)
    method = cfg.method.name
    hub_data = cfg.dataset.get("hub_name")
    data = ModelCardData(
        library_name="nora",
        tags=["nora", "peft", "rational-activations", method],
        base_model=base if "/" in base else None,
        license="apache-2.0",
    )
    nora_cfg = (ident.get("nora") or {}).get("config")
    peft_cfg = ident.get("peft")
    note = LOAD_NOTE.get(ident["kind"], "a peft adapter; PeftModel.from_pretrained loads it as well")
    body = [
        f"# {repo_id}",
        "",
        f"A **{method}** adapter ({', '.join(ident['components'])}) for `{base}`, trained with "
        "nora (NoRA: parameter-efficient fine-tuning of activation functions with learnable group-wise "
        "rationals).",
        "",
        "## Training",
        "",
        f"- method: `{method}`; adapter kind: `{ident['kind']}`",
        f"- base model: `{base}`",
        f"- data: `{cfg.dataset.name}`" + (f" (`{hub_data}`)" if hub_data else ""),
        f"- seed: {cfg.seed}; steps: {(summary or {}).get('steps', 'not recorded')}",
        f"- parameters: {_parameters(summary)}",
    ]
    if peft_cfg:
        body.append(
            f"- peft: {peft_cfg['peft_type']} r={peft_cfg['r']} alpha={peft_cfg['lora_alpha']} "
            f"dora={peft_cfg['use_dora']} on {peft_cfg['target_modules']}"
        )
    if nora_cfg:
        body.append(
            f"- NoRA: variant {nora_cfg['variant']}, r={nora_cfg['r']}, groups={nora_cfg['groups']}, "
            f"degrees {tuple(nora_cfg['degrees'])}, {ident['nora']['layers']} activations"
        )
    body += [
        "",
        "## Metrics",
        "",
        *_metrics(run_dir, summary),
        "",
        "## How to load",
        "",
        "```python",
        "from nora.hub import download_adapter",
        "from nora.app.adapters import apply_adapter",
        "from transformers import AutoModelForCausalLM",
        "",
        f'adapter_dir = download_adapter("{repo_id}")',
        f'base_model = AutoModelForCausalLM.from_pretrained("{base}")',
        f"model, identity = apply_adapter(base_model, adapter_dir)  # {note}",
        "```",
        "",
        "Evaluate with lm-evaluation-harness (lm_eval's own CLI, with nora's `nora` model registered):",
        "",
        "```bash",
        f"python -m nora.integrations.lm_eval --model nora --model_args pretrained={base},adapter={repo_id} "
        "--tasks mmlu --num_fewshot 5",
        "```",
        "",
        "## Training configuration",
        "",
        "```yaml",
        OmegaConf.to_yaml(cfg).strip(),
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content


def _refuse_symlink(path: Path, where: Path) -> None:
    if path.is_symlink():
        raise UserError(
            f"{path} is a symbolic link (to {os.readlink(path)}); push_to_hub uploads only regular files "
            f"inside {where}: replace the link by the file itself, or remove it"
        )


def publishable_files(adapter_dir: Path) -> list[Path]:
    """The regular files directly in ``adapter_dir`` that :func:`push_to_hub` uploads (not its own README.md).
    A symbolic link anywhere inside (it could point anywhere: another run's adapter, a private file) is a
    :class:`UserError` naming it; nothing outside the folder is ever read."""
    _refuse_symlink(adapter_dir, adapter_dir.parent)
    for root, dirs, names in os.walk(adapter_dir, followlinks=False):
        for name in sorted(dirs + names):
            _refuse_symlink(Path(root) / name, adapter_dir)
    return [p for p in sorted(adapter_dir.iterdir()) if p.is_file() and p.name != "README.md"]


def push_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``<run_dir>/adapter/`` and a generated model card to the Hub repository ``repo_id`` (created if
    missing); returns the commit URL. Load it back with :func:`nora.app.adapters.resolve_adapter` (any adapter loader),
    or evaluate it with lm_eval's ``nora`` model (``pretrained=<base>,adapter=<repo_id>``)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = Path(run_dir)
    adir = find_adapter_dir(run_dir)
    uploads = publishable_files(adir)  # before anything reads a file: a link inside is refused
    config = RunDir(run_dir).config
    _refuse_symlink(config, run_dir)
    cfg = read_run_config(run_dir)  # its config_hash checked against summary.json (nora.app.reload)
    why = adapter_mismatch(adapter_identity(adir), cfg.method, (read_summary(run_dir) or {}).get("adapter"))
    if why is not None:  # another kind than the method saves, or files other than summary.json's sha256s
        raise UserError(f"{why}; not publishing it: restore the run's own adapter, or retrain the run (force=true)")
    files = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in uploads]
    files.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(run_dir, repo_id).encode()))
    if config.exists():  # the run's full configuration, to rebuild the base model exactly
        files.append(CommitOperationAdd(path_in_repo="run_config.yaml", path_or_fileobj=str(config)))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id,
        operations=files,
        revision=revision,
        commit_message=commit_message or f"nora adapter from {run_dir.name}",
    )
    return str(commit.commit_url)
