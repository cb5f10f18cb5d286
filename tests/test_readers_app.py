"""The application layer checks what its writers recorded and refuses bad input where it enters (issue 32, part B):
publishing uploads only the adapter's own regular files with the hashes summary.json records, eval.py refuses an
edited config.yaml, config values with interpolation syntax read back as written, a bad value or a missing W&B key
touches nothing, signals while starting or setting up are one line, a checkpoint or W&B id of another run is one
line, a grad_accum that leaves batches unused says so, MMLU says when it cut questions, and a rank killed under
torchrun leaves the survivor one line.

Real processes (train.py, eval.py, torchrun) with Hydra overrides and real signals, real symlinks, a real fake Hub
server (tests/fake_hub.py) answering huggingface_hub's requests, real runs of ``vit_test`` and ``llama_tiny``."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from fixtures import write_cifar
from instruct_fixtures import tiny_nora_pp_run
from mmlu_fixtures import make_fixture, write_csv
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_hub import _python, nora_pp_run  # noqa: F401  (a pytest fixture: a NoRA++ run directory)
from test_mmlu import RiggedLM
from test_train_vision import tiny_overrides

from nora.app.adapters import adapter_identity, adapter_record
from nora.app.config import compose, validate
from nora.app.evaluation import eval_config
from nora.app.publish import push_to_hub
from nora.app.reload import read_run_config
from nora.app.training import run_training
from nora.errors import UserError
from nora.eval import evaluate_mmlu
from nora.models.tokenizer import build_offline_tokenizer
from nora.runs.identity import config_hash
from nora.runs.logger import LoggerConfig, credentials_problem

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_train=192, n_test=64)


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT), **extra)
    return env


def _lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def _train_py(args, cwd, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------ nothing touched on bad input
@pytest.mark.slow  # 15 s here: end to end (make test-slow, CI)
def test_a_bad_value_and_a_missing_wandb_key_touch_nothing(cifar10, tmp_path):
    out = tmp_path / "runs"
    proc = _train_py(tiny_overrides(cifar10, out, "nora", ["trainer.lr=abc"]), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr) == ["error: trainer.lr='abc': could not be converted to Float"]
    assert not out.exists()  # no run folder, no train.log (Hydra would create both before the job)

    env = {k: v for k, v in _env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE")}
    env["NETRC"] = str(tmp_path / "no_netrc")
    proc = _train_py(tiny_overrides(cifar10, out, "nora", ["logger=wandb_online"]), tmp_path, env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr) == [
        "error: logger.mode=online needs a W&B API key for https://api.wandb.ai and none is set: export "
        "WANDB_API_KEY=<key> (or run `wandb login`), or log offline with logger=wandb (upload later with `wandb sync`)"
    ]
    assert not out.exists()


def test_a_wandb_key_in_netrc_or_the_environment_passes(tmp_path, monkeypatch):
    online = LoggerConfig(backend="wandb", mode="online")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert credentials_problem(online).startswith("logger.mode=online needs a W&B API key")
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    assert credentials_problem(online) is None
    assert credentials_problem(LoggerConfig(backend="wandb", mode="offline")) is None
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    assert credentials_problem(online) is None


def test_an_unknown_key_lists_the_keys_of_its_own_section(tmp_path):
    with pytest.raises(UserError) as err:
        eval_config(compose(["+mmlu.shots=3"], "eval"))
    assert str(err.value) == (
        "mmlu.shots: no such key; valid: path, source, subjects, k, grouping, protocol, split, "
        "batch_size, max_length, bf16, save_predictions, progress"
    )
    with pytest.raises(UserError) as err:
        validate(compose(["model=vit_test", "logger=disabled", "method=nora_pp", "+method.lora.rank=3"]))
    assert str(err.value) == "method.lora.rank: no such key; valid: r, alpha, dropout, targets, use_dora"
    # eval.py itself: one line, nothing written
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "model=llama_tiny", "+mmlu.shots=3", f"output_root={tmp_path}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and _lines(proc.stderr)[-1].startswith("error: mmlu.shots: no such key; valid: path,")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- signals
def _start(args, cwd):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize(
    "sig,line",
    [
        (signal.SIGINT, "interrupted while starting; nothing was written"),
        (signal.SIGTERM, "stopped by SIGTERM while starting; nothing was written"),
    ],
)
def test_a_signal_while_train_py_imports_is_one_line(cifar10, tmp_path, sig, line):
    proc = _start(tiny_overrides(cifar10, tmp_path / "runs", "nora"), tmp_path)
    time.sleep(0.4)  # torch, transformers, peft and hydra take seconds to import
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and _lines(err) == [line]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # 17 s here: end to end (make test-slow, CI)
def test_sigterm_during_setup_is_one_line_and_the_next_run_starts(cifar10, tmp_path):
    args = tiny_overrides(cifar10, tmp_path / "runs", "nora", ["run_name=r"])
    proc = _start(args, tmp_path)
    lock = tmp_path / "runs" / "r" / ".lock"
    t0 = time.time()
    while not (lock.exists() and lock.read_text().strip()):  # run_training holds the run: setup starts now
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert _lines(err) == [
        "stopped by SIGTERM during setup, before training (re)started; run the same command to start it"
    ]
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists() and "trainable" not in out
    assert lock.read_text() == ""  # released
    done = _train_py(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow  # 11 s here: end to end (make test-slow, CI)
def test_a_rank_killed_under_torchrun_leaves_the_survivor_one_line(cifar10, tmp_path):
    out = tmp_path / "runs"
    env = _env(OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        *tiny_overrides(
            cifar10,
            out,
            "nora",
            [
                "trainer.epochs=50",
                "trainer.batch_size=4",
                "trainer.log_every=1",
                "trainer.eval_every=0",
                "trainer.checkpoint_every=2",
                "trainer.device=cpu",
                "run_name=r",
            ],
        ),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not (out / "r" / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.time() - t0 < 240
            time.sleep(0.1)
        ranks = {}
        pids = subprocess.run(["pgrep", "-f", str(ROOT / "train.py")], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank and int(pid) != proc.pid and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
                ranks[rank[0].decode()] = int(pid)
        os.kill(ranks["RANK=1"], signal.SIGKILL)
        log, _ = proc.communicate(timeout=120)  # no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    survivor = [ln for ln in log.splitlines() if ln.startswith("error: rank 0:")]
    assert len(survivor) == 1, log[-4000:]
    assert "another rank of this run stopped (killed, crashed or out of memory) at step" in survivor[0]
    assert survivor[0].endswith("; run the same command to resume") and "last checkpoint at step" in survivor[0]
    assert log.count("Traceback") <= 1  # torchrun's own summary only; none from the surviving rank


# ------------------------------------------------------------------------ resume: another run's artefacts
def test_resume_from_a_run_of_another_method_is_one_line_before_building(cifar10, tmp_path):
    lora_dir = tmp_path / "lora_run"
    run_training(compose(tiny_overrides(cifar10, tmp_path, "lora")), run_dir=lora_dir)
    nora_dir = tmp_path / "nora_run"
    with pytest.raises(UserError) as err:
        run_training(compose(tiny_overrides(cifar10, tmp_path, "nora", [f"resume={lora_dir}"])), run_dir=nora_dir)
    assert str(err.value) == (
        f"resume={lora_dir}: {lora_dir / 'checkpoints/last.pt'} was written by a run of method=lora "
        f"({lora_dir / 'config.yaml'}), this run is method=nora, model=vit_test: its tensors do not fit this model; "
        "resume from a run of this method and model, or resume=null"
    )
    assert sorted(p.name for p in nora_dir.iterdir()) == [".lock"]
    # the bare checkpoint file, with no run config next to it: the load refuses it, before copying anything
    bare = tmp_path / "bare" / "last.pt"
    bare.parent.mkdir()
    shutil.copy(lora_dir / "checkpoints/last.pt", bare)
    with pytest.raises(UserError) as err:
        run_training(compose(tiny_overrides(cifar10, tmp_path, "nora", [f"resume={bare}"])), run_dir=nora_dir)
    msg = str(err.value)
    assert msg.startswith(f"{bare} holds tensors this model does not have (") and "lora_" in msg and "\n" not in msg
    assert msg.endswith(
        "was it written by another method or model? resume from a checkpoint of this configuration, or resume=null"
    )
    assert not (nora_dir / "summary.json").exists() and not (nora_dir / "checkpoints").exists()


def test_a_damaged_wandb_run_id_is_one_line_on_resume(cifar10, tmp_path):
    run = tmp_path / "run"
    first = run_training(
        compose(
            tiny_overrides(cifar10, tmp_path, "nora", ["trainer.stop_after_steps=2", "trainer.checkpoint_every=1"])
        ),
        run_dir=run,
    )
    assert first["status"] == "incomplete"
    (run / "wandb").mkdir()
    (run / "wandb" / "run_id").write_text("../../my run?\n")
    step = torch.load(run / "checkpoints/last.pt", weights_only=False)["state"]["step"]
    with pytest.raises(UserError) as err:
        run_training(compose(tiny_overrides(cifar10, tmp_path, "nora", ["logger=wandb"])), run_dir=run)
    assert str(err.value) == (
        f"{run / 'wandb/run_id'} holds '../../my run?', not a W&B run id (printable characters without spaces or "
        ":;,#?/'); write back the id of this run's W&B run, or delete the file to log to a new W&B run"
    )
    assert torch.load(run / "checkpoints/last.pt", weights_only=False)["state"]["step"] == step


# ------------------------------------------------------------------------------------- what one run uses
def test_grad_accum_that_leaves_batches_unused_says_so(tmp_path, logged):
    data = write_cifar(tmp_path / "c70", "cifar10", n_train=70, n_test=16)
    run_training(
        compose(
            tiny_overrides(
                data, tmp_path, "nora", ["trainer.batch_size=16", "trainer.grad_accum=3", "trainer.epochs=1"]
            )
        ),
        run_dir=tmp_path / "run",
    )
    notes = [ln for ln in logged().splitlines() if ln.startswith("note:")]
    assert notes == [
        "note: an epoch is 4 batches and trainer.grad_accum=3 makes 1 optimizer step(s) of 3 batches; the "
        "last 1 batch(es) are skipped: 22 of the 70 examples are not used each epoch (a different set "
        "each epoch when shuffled); a grad_accum that divides 4, or another trainer.batch_size, uses "
        "them all"
    ]
    run_training(
        compose(
            tiny_overrides(
                data, tmp_path, "nora", ["trainer.batch_size=16", "trainer.grad_accum=2", "trainer.epochs=1"]
            )
        ),
        run_dir=tmp_path / "run2",
    )
    assert "note:" not in logged()  # 2 divides 4: only the partial last batch is left, as always


def test_a_literal_interpolation_value_is_stored_escaped_and_the_same_command_resumes(tmp_path, monkeypatch, logged):
    literal = "c10_${oc.env:NORA_T32_V}"  # a directory whose name holds interpolation syntax
    data = write_cifar(tmp_path / literal, "cifar10", n_train=192, n_test=64)
    overrides = tiny_overrides(tmp_path / "c10_\\${oc.env:NORA_T32_V}", tmp_path, "nora")  # as typed after the shell
    run = tmp_path / "run"
    monkeypatch.setenv("NORA_T32_V", "first")
    first = run_training(compose(overrides + ["trainer.stop_after_steps=2"]), run_dir=run)
    assert first["status"] == "incomplete"
    text = (run / "config.yaml").read_text()
    assert "c10_\\${oc.env:NORA_T32_V}" in text and "first" not in text
    assert read_run_config(run).dataset.root == str(data)  # read back as written, whatever the environment holds
    monkeypatch.setenv("NORA_T32_V", "second")
    logged()
    done = run_training(compose(overrides), run_dir=run)  # the same command resumes
    assert "resumed from" in logged() and done["status"] == "complete"
    assert done["config_hash"] == config_hash(compose(overrides))
    assert read_run_config(run).dataset.root == str(data)  # the completed run's config passes the hash check


# --------------------------------------------------------------------------------------- eval and publish
@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    return tiny_nora_pp_run(tmp_path_factory.mktemp("llmrun"), max_steps=2)


@pytest.mark.slow  # 9 s here: end to end (make test-slow, CI)
def test_eval_and_publish_refuse_an_edited_config_yaml(llm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llm_run, run)
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.init_seed == 0
    cfg.model.init_seed = 7
    OmegaConf.save(cfg, run / "config.yaml")
    want = (
        f"{run / 'config.yaml'} is not the config this run trained with (edited after training: "
        "model.init_seed: 0 -> 7); restore the file or retrain the run (force=true)"
    )
    mmlu = write_csv(tmp_path / "mmlu", make_fixture())
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"run_dir={run}", f"mmlu.path={mmlu}", "device=cpu"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr)[-1] == f"error: {want}"
    assert not (run / "mmlu.json").exists()
    with pytest.raises(UserError) as err:
        push_to_hub(run, "me/edited", token="hf_test")
    assert str(err.value) == want


PUSH = """
    import json, sys
    from nora.app.publish import push_to_hub
    from nora.errors import UserError
    try:
        print(json.dumps({"url": push_to_hub(sys.argv[1], "me/x")}))
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
"""


def _push(run, tmp_path):
    with FakeHub(tmp_path / "hub") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_CACHE": str(tmp_path / "cache")}
        proc = _python(PUSH.replace("sys.argv[1]", repr(str(run))), env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1]), list(hub.requests)


@pytest.mark.slow  # 22 s here: end to end (make test-slow, CI)
def test_push_to_hub_uploads_only_the_runs_own_regular_files(nora_pp_run, tmp_path):  # noqa: F811
    adir = nora_pp_run / "adapter"
    summary = json.loads((nora_pp_run / "summary.json").read_text())
    summary["adapter"] = adapter_record(adapter_identity(adir))  # what run_training records
    (nora_pp_run / "summary.json").write_text(json.dumps(summary))
    secret = tmp_path / "secret.txt"
    secret.write_text("a private file outside the run\n")
    # a symbolic link in the adapter folder: an error naming it; nothing reaches the hub
    (adir / "notes.txt").symlink_to(secret)
    result, requests = _push(nora_pp_run, tmp_path)
    assert result == {
        "error": f"{adir / 'notes.txt'} is a symbolic link (to {secret}); push_to_hub uploads only "
        f"regular files inside {adir}: replace the link by the file itself, or remove it"
    }
    assert requests == []
    (adir / "notes.txt").unlink()
    (adir / "more").mkdir()
    (adir / "more" / "deep").symlink_to(secret)
    assert _push(nora_pp_run, tmp_path)[0]["error"].startswith(f"{adir / 'more' / 'deep'} is a symbolic link")
    shutil.rmtree(adir / "more")
    # an adapter file that is not the one summary.json records: refused, nothing uploaded
    weights = adir / "adapter_model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, str(weights), metadata={"format": "pt"})
    have = adapter_identity(adir)["files"]["adapter_model.safetensors"]
    result, requests = _push(nora_pp_run, tmp_path)
    assert result == {
        "error": (
            f"{weights} is not the file this run saved (sha256 {have[:12]}..., summary.json records "
            f"{summary['adapter']['files']['adapter_model.safetensors'][:12]}...); not publishing it: restore "
            f"the run's "
            "own adapter, or retrain the run (force=true)"
        )
    }
    assert requests == []


# ------------------------------------------------------------------------------------------------- MMLU
def test_mmlu_says_when_max_length_cuts_questions(tmp_path):
    tok = build_offline_tokenizer()
    path = write_csv(tmp_path, make_fixture(["abstract_algebra"], n_test=6))
    with pytest.warns(UserWarning) as record:
        r = evaluate_mmlu(
            RiggedLM(tok, prefer="B"), tok, path, subjects=["abstract_algebra"], k=5, max_length=8, progress=False
        )
    assert r.to_dict()["shots"]["truncated_questions"] == 6
    msgs = [str(w.message) for w in record if "cut from the left" in str(w.message)]
    assert msgs == [
        "MMLU: 6 of 6 questions do not fit max_length (8 tokens) even zero-shot and were cut from the "
        "left: their scores read a truncated question and the accuracy is not comparable; raise "
        "mmlu.max_length (null: the model's context length)"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a length that fits: no warning
        evaluate_mmlu(RiggedLM(tok, prefer="B"), tok, path, subjects=["abstract_algebra"], k=0, progress=False)


def test_sigterm_inside_an_omegaconf_call_during_setup_keeps_its_status_and_one_line(capsys):
    """A signal handler runs wherever the main thread is; inside an OmegaConf call, OmegaConf re-raises the handler's
    exception as type(exc)(message + key context): still exit status 143 and one line (seen once in CI as 130)."""
    from omegaconf import OmegaConf

    from nora.errors import user_errors
    from nora.train.signals import SetupGuard

    OmegaConf.register_new_resolver(
        "nora_test_sigterm", lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(1), replace=True
    )
    cfg = OmegaConf.create({"a": {"b": "${nora_test_sigterm:}"}})
    with pytest.raises(SystemExit) as stop, user_errors(), SetupGuard():
        _ = cfg.a.b
    assert stop.value.code == 143
    line = "stopped by SIGTERM during setup, before training (re)started; run the same command to start it"
    assert capsys.readouterr().err.splitlines() == [line]
    # OmegaConf's other way (a node access): the same type re-made from the message and its key context
    from nora.errors import Terminated

    with pytest.raises(SystemExit) as stop, user_errors():
        raise Terminated(line + "\n    full_key: hydra\n    object_type=dict")
    assert stop.value.code == 143 and capsys.readouterr().err.splitlines() == [line]
