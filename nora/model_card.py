"""The model card (``README.md``) :func:`nora.push_to_hub` uploads with a run's adapter: method, base model, data,
parameters, metrics and how to load it, written from the run's ``config.yaml``, ``summary.json``, ``mmlu.json``
and adapter files. huggingface_hub's ``ModelCard``/``ModelCardData`` write the YAML metadata block the Hub reads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

# the one loader of every adapter kind; the note says what peft's own loader does with it
LOAD_NOTE = {
    "nora++": "LoRA + NoRA; peft's PeftModel.from_pretrained alone refuses it (it would drop NoRA)",
    "nora": "NoRA activations (and a new head, if any)",
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
    from nora.files import read_json
    from nora.runs.layout import RunDir

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

    from nora.runs import adapter_identity, find_adapter_dir, read_run_config
    from nora.runs.layout import read_summary

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    summary = read_summary(run_dir)
    ident = adapter_identity(find_adapter_dir(run_dir))
    base = _base_model(cfg)
    method = cfg.method.name
    hub_data = cfg.dataset.get("hub_name")
    data = ModelCardData(library_name="nora", tags=["nora", "peft", "rational-activations", method],
                         base_model=base if "/" in base else None, license="apache-2.0")
    nora_cfg = (ident.get("nora") or {}).get("config")
    peft_cfg = ident.get("peft")
    note = LOAD_NOTE.get(ident["kind"], "a peft adapter; PeftModel.from_pretrained loads it as well")
    body = [
        f"# {repo_id}", "",
        f"A **{method}** adapter ({', '.join(ident['components'])}) for `{base}`, trained with "
        "nora (NoRA: parameter-efficient fine-tuning of activation functions with learnable group-wise "
        "rationals).", "",
        "## Training", "",
        f"- method: `{method}`; adapter kind: `{ident['kind']}`",
        f"- base model: `{base}`",
        f"- data: `{cfg.dataset.name}`" + (f" (`{hub_data}`)" if hub_data else ""),
        f"- seed: {cfg.seed}; steps: {(summary or {}).get('steps', 'not recorded')}",
        f"- parameters: {_parameters(summary)}",
    ]
    if peft_cfg:
        body.append(f"- peft: {peft_cfg['peft_type']} r={peft_cfg['r']} alpha={peft_cfg['lora_alpha']} "
                    f"dora={peft_cfg['use_dora']} on {peft_cfg['target_modules']}")
    if nora_cfg:
        body.append(f"- NoRA: variant {nora_cfg['variant']}, r={nora_cfg['r']}, groups={nora_cfg['groups']}, "
                    f"degrees {tuple(nora_cfg['degrees'])}, {ident['nora']['layers']} activations")
    body += ["", "## Metrics", "", *_metrics(run_dir, summary), "",
             "## How to load", "", "```python",
             "from nora.hub import download_adapter", "from nora.runs import apply_adapter",
             "from transformers import AutoModelForCausalLM", "",
             f'adapter_dir = download_adapter("{repo_id}")',
             f'base_model = AutoModelForCausalLM.from_pretrained("{base}")',
             f"model, identity = apply_adapter(base_model, adapter_dir)  # {note}", "```", "",
             "Evaluate with lm-evaluation-harness (lm_eval's own CLI, with nora's `nora` model registered):", "",
             "```bash",
             f"python -m nora.integrations.lm_eval --model nora --model_args pretrained={base},adapter={repo_id} "
             "--tasks mmlu --num_fewshot 5", "```", "",
             "## Training configuration", "", "```yaml", OmegaConf.to_yaml(cfg).strip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content
