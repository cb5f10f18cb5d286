"""Hub access, offline: reachability through huggingface_hub's own session (proxies, HF_ENDPOINT,
HF_HUB_OFFLINE), and nora.push_to_hub / loading an adapter by Hub id against tests/fake_hub.py, a local HTTP
server that answers huggingface_hub's real upload and download requests (each in a second process, where
HF_ENDPOINT is read when huggingface_hub is imported, as for a user)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from fake_hub import FakeHub
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nora
from nora.app.adapters import resolve_adapter
from nora.errors import MissingFileError

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # the test environment's own offline and proxy settings stay out; each test sets what it checks
    unset = {
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HF_ENDPOINT",
    }
    env = {
        **{k: v for k, v in os.environ.items() if k not in unset},
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "TOKENIZERS_PARALLELISM": "false",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


# ------------------------------------------------------------------------------------------ reachability
PROBE = """
    import json, os
    from nora.hub import go_offline_if_unreachable
    offline = go_offline_if_unreachable()
    print(json.dumps({"offline": offline, "env": os.environ.get("HF_HUB_OFFLINE")}))
"""


@pytest.mark.slow  # 20 s here: end to end (make test-slow, CI)
def test_reachability_goes_through_the_proxy_and_hf_endpoint(tmp_path):
    with FakeHub(tmp_path / "hub") as proxy:  # any HTTP server answers as a proxy would
        # the endpoint's host does not resolve: only a client that uses HTTP_PROXY reaches it
        proc = _python(PROBE, {"HF_ENDPOINT": "http://hub.invalid", "HTTP_PROXY": proxy.url, "NO_PROXY": ""}, tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout) == {"offline": False, "env": None}
        assert proxy.requests == [("HEAD", "http://hub.invalid/")]  # the proxy saw the probe for the endpoint
        # HF_HUB_OFFLINE: no request at all
        proc = _python(PROBE, {"HF_ENDPOINT": proxy.url, "HF_HUB_OFFLINE": "1"}, tmp_path)
        assert json.loads(proc.stdout)["offline"] is True and len(proxy.requests) == 1
    # nothing listens there any more: offline mode is switched on for the HF libraries
    proc = _python(PROBE, {"HF_ENDPOINT": proxy.url}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"offline": True, "env": "1"}


# ------------------------------------------------------------------------------------ push and load back
@pytest.fixture()
def nora_pp_run(tmp_path):
    """A NoRA++ run directory as run_training leaves it (config.yaml, summary.json, adapter/), without training:
    the base model rebuilt from the config, LoRA + NoRA applied and perturbed."""
    from nora.app.reload import build_base_model

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", ["method=nora_pp", "model=llama_tiny", "dataset=alpaca", "logger=disabled"])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    run = tmp_path / "runs" / "llama_tiny_alpaca_nora_pp_s0"
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    model, tok = build_base_model(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    nora.apply_nora(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    nora.save_nora(model, run / "adapter")
    summary = {
        "status": "complete",
        "method": "nora_pp",
        "steps": 3,
        "metric": "val_loss",
        "final": {"val_loss": 4.25},
        "parameters": nora.parameter_report(model).to_dict(),
    }
    (run / "summary.json").write_text(json.dumps(summary))
    ids = torch.randint(3, len(tok), (2, 12))
    model.eval()
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "want.pt")
    return run


PUSH_AND_LOAD = """
    import sys, torch, nora
    from nora.app.adapters import apply_adapter, resolve_adapter
    from nora.app.publish import push_to_hub
    from nora.app.reload import build_base_model, read_run_config
    run, repo = sys.argv[1], sys.argv[2]
    print(push_to_hub(run, repo))
    adir = resolve_adapter(repo)          # downloaded into HF_HUB_CACHE
    model, _ = build_base_model(read_run_config(run))
    model, ident = apply_adapter(model, adir)
    want = torch.load(sys.argv[3])
    with torch.no_grad():
        assert torch.equal(model(want["ids"]).logits, want["logits"])
    print("loaded", ident["kind"], adir)
"""


def test_push_to_hub_then_load_by_hub_id(tmp_path, nora_pp_run):
    with FakeHub(tmp_path / "hub") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_CACHE": str(tmp_path / "cache")}
        code = PUSH_AND_LOAD.replace("sys.argv[1], sys.argv[2]", f"{str(nora_pp_run)!r}, 'me/llama-tiny-nora-pp'")
        code = code.replace("sys.argv[3]", repr(str(tmp_path / "want.pt")))
        proc = _python(code, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.files("me/llama-tiny-nora-pp")
    assert proc.stdout.splitlines()[0] == f"{hub.url}/me/llama-tiny-nora-pp/commit/{hub.sha('me/llama-tiny-nora-pp')}"
    assert proc.stdout.splitlines()[-1].startswith("loaded nora++ " + str(tmp_path / "cache"))
    # NoRA++ is one peft adapter (peft type NORA): nora.save_nora writes it, peft's loader reads it
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "run_config.yaml"]
    assert json.loads(files["adapter_config.json"])["peft_type"] == "NORA"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert files[name] == (nora_pp_run / "adapter" / name).read_bytes()
    assert sum(method == "POST" and "/commit/" in path for method, path in hub.requests) == 1  # one commit
    card = files["README.md"].decode()
    assert hub.validated == [True]  # the Hub's own check of the card's metadata block
    params = json.loads((nora_pp_run / "summary.json").read_text())["parameters"]
    assert params["components"]["lora"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 128 * 4)  # q_proj, up_proj per layer
    assert card.startswith("---\n") and "library_name: nora" in card and "license: apache-2.0" in card
    for text in (
        "**nora_pp** adapter (lora, nora)",
        "- data: `alpaca` (`tatsu-lab/alpaca`)",
        "- seed: 0; steps: 3",
        f"- parameters: trainable {params['trainable']:,} of {params['total']:,}",
        "nora 156, lora 2,560",
        '| final (val_loss) | {"val_loss": 4.25} |',
        "- NoRA: variant nora, r=3, groups=8, degrees (5, 4), 2 activations",
        'adapter_dir = download_adapter("me/llama-tiny-nora-pp")',
        "apply_adapter(base_model, adapter_dir)  # LoRA + NoRA, one peft adapter: "
        "peft.PeftModel.from_pretrained loads it after `import nora`",
        "python -m nora.integrations.lm_eval --model nora --model_args pretrained=",
        "adapter=me/llama-tiny-nora-pp",
    ):
        assert text in card, text


def test_unknown_hub_adapter_says_hf_download(tmp_path):
    with FakeHub(tmp_path / "hub") as hub:
        proc = _python(
            """
            from nora.app.adapters import resolve_adapter
            resolve_adapter("me/missing")
        """,
            {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")},
            tmp_path,
        )
    assert proc.returncode != 0
    assert "adapter 'me/missing' is neither a local directory nor downloadable from" in proc.stderr
    assert "hf download me/missing --local-dir <dir>" in proc.stderr


def test_local_paths_never_go_to_the_hub(tmp_path):
    with pytest.raises(MissingFileError, match="adapter or run directory not found"):
        resolve_adapter(tmp_path / "runs" / "nothing")
    with pytest.raises(MissingFileError, match="adapter or run directory not found"):
        resolve_adapter("./runs/nothing/here")


def test_messages_name_the_cli_the_pinned_hub_client_installs():
    import importlib.metadata as md

    scripts = {ep.name for ep in md.distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    assert "hf" in scripts and "huggingface-cli" not in scripts
    stale = [str(p.relative_to(ROOT)) for p in (ROOT / "nora").rglob("*.py") if "huggingface-cli" in p.read_text()]
    assert stale == []
    assert "`hf download" in (ROOT / "nora" / "models" / "causal_lm.py").read_text()
