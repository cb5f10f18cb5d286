"""Runs that cannot be clobbered, corrupted or lose work (issue 11): one owner per run directory, a fresh start
that leaves nothing of the earlier run, on_config_change=keep recording what the resumed run uses, unreadable
checkpoints and torn metrics lines, full and read-only disks, non-finite weights, Ctrl-C and SIGTERM.

Real runs of ``vit_test`` on CIFAR-format files; the lock, Ctrl-C and SIGTERM tests run ``train.py`` as real
processes and send them real signals; disk-full and read-only use a real tmpfs and a real read-only bind mount."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fixtures import write_cifar
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_train_vision import make_cfg, tiny_overrides

from nora.app.training import run_training
from nora.errors import NonFiniteLossError, OutputError, UserError
from nora.runs.identity import config_hash
from nora.runs.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RUN_NAME = "vit_test_cifar10_nora_s0"


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_train=192, n_test=64)


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))


@contextmanager
def train_process(overrides, tmp_path, name="a"):
    """``python train.py <overrides>`` as a real process (stdout/stderr to files); always killed at the end."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as o, open(err, "w") as e:
        # the run name fixed, so the tests know the directory whatever overrides they pass (nora.runs.naming)
        # SIGINT as in a terminal: a test run started in the background (`make test &`, nohup) inherits SIGINT
        # ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={RUN_NAME}"],
            cwd=tmp_path,
            env=_env(),
            stdout=o,
            stderr=e,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    proc.out, proc.err = out, err
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def wait_until(condition, proc, what, timeout=300):
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n{proc.err.read_text()[-3000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def train_steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def ckpt_step(run_dir):
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=False)["state"]["step"]


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


# a run long enough to be signalled mid-way: 48 steps per epoch, a metrics line every step
LONG = ["trainer.epochs=50", "trainer.batch_size=4", "trainer.log_every=1", "trainer.eval_every=0"]


# ------------------------------------------------------------------------- a run directory has one owner
@pytest.mark.slow  # 15 s here: end to end (make test-slow, CI)
def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(cifar10, tmp_path, logged):
    overrides = tiny_overrides(cifar10, tmp_path, "nora", LONG + ["trainer.checkpoint_every=2"])
    run_dir = tmp_path / RUN_NAME
    with train_process(overrides, tmp_path) as first:
        wait_until(lambda: (run_dir / "checkpoints/last.pt").exists(), first, "the first checkpoint")
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={RUN_NAME}"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr + second.stdout
        assert lines[0].startswith(
            f"error: {run_dir} is in use by pid {first.pid} on {socket.gethostname()} (since {holder['since']})"
        )
        assert first.poll() is None  # the owner goes on
        steps = train_steps(run_dir)
        assert steps == list(range(1, len(steps) + 1))  # one writer: every step once
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it, the file stays
        first.wait(timeout=60)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid
    stopped_at = ckpt_step(run_dir)
    resumed = run_training(make_cfg(overrides + ["trainer.stop_after_steps=1"]), run_dir=run_dir)
    out = logged()
    assert f"taking over the lock left by pid {first.pid} on {socket.gethostname()}" in out
    assert resumed == {"status": "incomplete", "step": stopped_at + 1}
    assert (run_dir / ".lock").read_text() == ""  # released on exit


def test_the_lock_is_released_by_a_run_that_fails(cifar10, tmp_path):
    from nora.runs.lock import RunLock

    cfg = make_cfg(tiny_overrides(cifar10, tmp_path, "nora", ["trainer.optimizer=adam"]))
    with pytest.raises(UserError, match="trainer.optimizer='adam'; valid: adamw, sgd"):
        run_training(cfg, run_dir=tmp_path / "run")
    with RunLock(tmp_path / "run"):  # free again
        assert json.loads((tmp_path / "run/.lock").read_text())["pid"] == os.getpid()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, logged):
    import errno

    from nora.runs import lock as run_lock

    def no_locks(fd, op):  # what flock raises on NFS/Lustre mounts without lock support
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with run_lock.RunLock(tmp_path / "run"):
        pass
    assert logged().startswith(f"warning: cannot lock {tmp_path / 'run/.lock'} ([Errno 37] No locks")


# ------------------------------------------------------------------------------------ a fresh start
def test_a_fresh_start_leaves_nothing_of_the_earlier_run(cifar10, tmp_path):
    from nora.app.reload import load_trained_model

    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "nora_pp", ["trainer.epochs=1"])
    run_training(make_cfg(base), run_dir=run)
    (run / "mmlu.json").write_text(json.dumps({"accuracy": 0.25}))  # as eval.py run_dir=... leaves it
    # NoRA++: one peft adapter (peft type NORA)
    assert {"adapter_config.json", "adapter_model.safetensors"} == {p.name for p in (run / "adapter").iterdir()}
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "NORA"
    assert load_trained_model(run).adapter["kind"] == "nora++"

    lora = tiny_overrides(cifar10, tmp_path, "lora", ["trainer.epochs=1", "on_config_change=rerun"])
    summary = run_training(make_cfg(lora), run_dir=run)
    assert sorted(p.name for p in (run / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not (run / "activations.png").exists() and not (run / "mmlu.json").exists()
    assert load_trained_model(run).adapter["kind"] == "lora"
    assert json.loads((run / "summary.json").read_text())["method"] == summary["method"] == "lora"
    assert train_steps(run) == [2, 4, 6]  # the nora_pp run's metrics are gone, not followed by lora's

    # force=true starts afresh the same way (and resume=null: test_an_unreadable_checkpoint_...)
    (run / "mmlu.json").write_text("{}")
    run_training(make_cfg(lora + ["force=true", "trainer.stop_after_steps=2"]), run_dir=run)
    assert not (run / "mmlu.json").exists() and not (run / "summary.json").exists()
    assert not (run / "adapter").exists() and train_steps(run) == [2]

    # resume=<another run> continues that run's checkpoint here: nothing of this directory's earlier run stays
    other = tmp_path / "other"
    other.mkdir()
    (other / "mmlu.json").write_text("{}")
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    part = run_training(make_cfg(lora + [f"resume={run}", "trainer.stop_after_steps=2"]), run_dir=other)
    assert part == {"status": "incomplete", "step": 4}
    assert not (other / "mmlu.json").exists() and train_steps(other) == [4]
    assert (run / "checkpoints/last.pt").exists()  # the other run's checkpoint is left as it was


# ---------------------------------------------------------------------------- on_config_change=keep
def test_keep_records_the_configuration_the_resumed_run_uses(cifar10, tmp_path, logged):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "nora", ["trainer.checkpoint_every=2"])
    part = run_training(make_cfg(base + ["trainer.stop_after_steps=3"]), run_dir=run)
    assert part == {"status": "incomplete", "step": 3}
    kept = run_training(make_cfg(base + ["trainer.lr=1e6", "on_config_change=keep"]), run_dir=run)
    assert "on_config_change=keep uses it as it is" in logged()
    stored = OmegaConf.load(run / "config.yaml")
    assert stored.trainer.lr is None and stored.on_config_change == "keep"
    assert kept["config_hash"] == config_hash(make_cfg(base)) != config_hash(make_cfg(base + ["trainer.lr=1e6"]))
    assert all(r["lr"] < 1 for r in read_metrics(run) if "lr" in r)  # it trained at the checkpoint's lr
    assert kept["steps"] == 12
    # and the run is now that configuration's complete run: skipped, not "another configuration"
    assert run_training(make_cfg(base), run_dir=run)["date"] == kept["date"]


# ------------------------------------------------------------------------------ faults lose nothing
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_an_unreadable_checkpoint_is_one_line_with_the_way_out(cifar10, tmp_path, damage):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "linear_probe", ["trainer.checkpoint_every=2"])
    run_training(make_cfg(base + ["trainer.stop_after_steps=2"]), run_dir=run)
    ckpt = run / "checkpoints/last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(UserError) as err:
        run_training(make_cfg(base), run_dir=run)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt} is not a readable checkpoint") and "resume=null" in msg and "\n" not in msg
    fresh = run_training(make_cfg(base + ["resume=null"]), run_dir=run)
    assert fresh["status"] == "complete" and fresh["steps"] == 12


def test_a_half_written_metrics_line_is_dropped_on_resume(cifar10, tmp_path, logged):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "linear_probe", ["trainer.checkpoint_every=2", "trainer.log_every=1"])
    run_training(make_cfg(base + ["trainer.stop_after_steps=4"]), run_dir=run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0, "loss": 2.3')  # power lost mid-line
    assert train_steps(run) == [1, 2, 3, 4]  # readers skip it too
    summary = run_training(make_cfg(base), run_dir=run)
    assert f"warning: {run / 'metrics.jsonl'}: dropped the half-written last line" in logged()
    assert summary["steps"] == 12 and train_steps(run) == list(range(1, 13))


def test_a_bad_metrics_line_before_the_last_names_file_and_line(tmp_path):
    from nora.runs.logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not a JSON record"):
        RunLogger(tmp_path).truncate_after(3)


def test_weights_gone_non_finite_keep_the_last_good_checkpoint(cifar10, tmp_path, monkeypatch):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "nora", ["trainer.checkpoint_every=1"])
    run_training(make_cfg(base + ["trainer.stop_after_steps=2"]), run_dir=run)
    good = (run / "checkpoints/last.pt").read_bytes()
    real_step = torch.optim.AdamW.step

    # a diverging update: the third step makes a weight infinite while that step's loss (computed before the
    # update) is finite, so the loss check alone let the checkpoint at step 3 replace the good one
    def diverging(self, *a, **k):
        out = real_step(self, *a, **k)
        first = self.param_groups[0]["params"][0]
        if int(self.state[first]["step"]) == 3:
            with torch.no_grad():
                first.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging)
    with pytest.raises(NonFiniteLossError, match=f"non-finite weights at step 3 .*{run / 'checkpoints/last.pt'}"):
        run_training(make_cfg(base), run_dir=run)
    assert (run / "checkpoints/last.pt").read_bytes() == good and ckpt_step(run) == 2


@contextmanager
def mounted(target: Path, *options: str, source: str = "tmpfs"):
    """A real mount (tmpfs, or a read-only bind mount of ``target``); skips where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root and mount(8)")
    if source == "bind":
        cmds = [["mount", "--bind", str(target), str(target)], ["mount", "-o", "remount,ro,bind", str(target)]]
    else:
        cmds = [["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)]]
    for cmd in cmds:
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip(f"cannot mount here ({' '.join(cmd)} needs root in a container that allows mounts)")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(cifar10, tmp_path):
    with mounted(tmp_path / "disk", "size=16m") as disk:
        run = disk / "run"
        # full fine-tuning: a checkpoint of ~400 KB (all weights and two Adam moments)
        base = tiny_overrides(cifar10, disk, "full", ["trainer.checkpoint_every=2", "trainer.log_every=100"])
        run_training(make_cfg(base + ["trainer.stop_after_steps=2"]), run_dir=run)
        good = (run / "checkpoints/last.pt").read_bytes()
        with open(disk / "filler", "wb") as f:  # fill the disk but for 64 KiB: less than a checkpoint
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            f.write(b"\0" * (free - (64 << 10)))
        with pytest.raises(OutputError) as err:
            run_training(make_cfg(base), run_dir=run)
        msg = str(err.value)
        assert msg.startswith(f"cannot write {run / 'checkpoints/last.pt'}: [Errno 28] No space left on device")
        assert "\n" not in msg
        assert (run / "checkpoints/last.pt").read_bytes() == good
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]  # no temp file left


def test_a_read_only_output_directory_is_one_line_from_train_py(cifar10, tmp_path):
    with mounted(tmp_path / "ro", source="bind") as ro:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *tiny_overrides(cifar10, ro, "nora"), f"run_name={RUN_NAME}"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert error_lines(proc.stderr) == [f"error: cannot write {ro / RUN_NAME}: [Errno 30] Read-only file system"]


def test_user_errors_turns_refused_writes_and_ctrl_c_into_one_line(capsys):
    import errno

    from nora.errors import user_errors

    cases = [
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.jsonl"),
            2,
            "error: /runs/r/metrics.jsonl: [Errno 28] No space left on device",
        ),
        (OSError(errno.EROFS, "Read-only file system"), 2, "error: [Errno 30] Read-only file system"),
        (
            OutputError("cannot write /runs/r/summary.json: [Errno 28] No space left on device"),
            2,
            "error: cannot write /runs/r/summary.json: [Errno 28] No space left on device",
        ),
        (KeyboardInterrupt(), 130, "interrupted; run the same command to continue"),
    ]
    for exc, code, line in cases:
        with pytest.raises(SystemExit) as stop, user_errors():
            raise exc
        assert stop.value.code == code and capsys.readouterr().err == line + "\n"
    with pytest.raises(FileNotFoundError), user_errors():  # not a refused write: a bug or a missing input
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x")


# ----------------------------------------------------------------------------------- Ctrl-C, SIGTERM
def test_ctrl_c_is_one_line_saying_where_the_run_stopped(cifar10, tmp_path):
    overrides = tiny_overrides(cifar10, tmp_path, "nora", LONG + ["trainer.checkpoint_every=4"])
    run_dir = tmp_path / RUN_NAME
    with train_process(overrides, tmp_path) as proc:
        wait_until(lambda: len(train_steps(run_dir)) >= 6, proc, "six steps")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    stderr = proc.err.read_text()
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    m = re.fullmatch(
        r"interrupted at step (\d+); last checkpoint at step (\d+); run the same command to resume", lines[0]
    )
    assert m, lines[0]
    step, last = int(m[1]), int(m[2])
    assert last == ckpt_step(run_dir) and last % 4 == 0 and 4 <= last <= step


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it():
    """A Ctrl-C that lands between the checkpoint's rename and the step the trainer records for it is raised
    once both are done, so the one line names the checkpoint that is on disk (the race behind a report of step 4
    with step 8 on disk, seen when the suite ran on loaded cores)."""
    from nora.train.signals import ctrl_c_deferred

    done, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here, inside the block
            done.append("checkpoint written and recorded")
    assert done == ["checkpoint written and recorded"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_sigterm_writes_a_checkpoint_at_the_current_step(cifar10, tmp_path, logged):
    overrides = tiny_overrides(cifar10, tmp_path, "nora", LONG + ["trainer.checkpoint_every=1000"])
    run_dir = tmp_path / RUN_NAME
    with train_process(overrides, tmp_path) as proc:
        wait_until(lambda: len(train_steps(run_dir)) >= 5, proc, "five steps")
        proc.send_signal(signal.SIGTERM)  # what SLURM sends at preemption and at the time limit
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    lines = error_lines(proc.err.read_text())
    m = re.fullmatch(
        r"stopped by SIGTERM at step (\d+); checkpoint written at step (\d+); run the same command to "
        r"resume",
        lines[-1] if lines else "",
    )
    assert m and m[1] == m[2], lines
    step = int(m[1])
    assert step >= 5 and ckpt_step(run_dir) == step and train_steps(run_dir)[-1] == step
    resumed = run_training(make_cfg(overrides + ["trainer.stop_after_steps=1"]), run_dir=run_dir)
    assert f"at step {step} (epoch" in logged() and resumed["step"] == step + 1


def test_the_slurm_timeout_signal_checkpoints_before_submitit_requeues(cifar10, tmp_path, monkeypatch):
    """Under hydra/launcher=slurm, SLURM sends SIGUSR2 signal_delay_s before the time limit and submitit's
    handler for it requeues the job and exits: it must run only once the checkpoint at the current step is on
    disk. Here a stand-in for that handler records the checkpoint it finds, and the signal is real (os.kill)."""
    from nora.train.tasks import ClassificationTask

    run = tmp_path / "run"
    seen = {}

    def submitit_requeue(signum, frame):  # what submitit's checkpoint_and_try_requeue does last: sys.exit(-1)
        seen["signal"], seen["checkpoint_step"] = signum, ckpt_step(run)
        raise SystemExit(-1)

    real, calls = ClassificationTask.loss, {"n": 0}

    def loss_then_signal(self, model, batch, normalizer):
        calls["n"] += 1
        if calls["n"] == 3:  # SLURM's signal arrives during the third step
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(self, model, batch, normalizer)

    monkeypatch.setattr(ClassificationTask, "loss", loss_then_signal)
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        with pytest.raises(SystemExit):
            run_training(
                make_cfg(tiny_overrides(cifar10, tmp_path, "nora", ["trainer.checkpoint_every=1000"])), run_dir=run
            )
        assert signal.getsignal(signal.SIGUSR2) is submitit_requeue  # restored after the run
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == {"signal": signal.SIGUSR2, "checkpoint_step": 3}


def test_slurm_launchers_requeue_on_timeout():
    """Both SLURM launchers, as Hydra composes them for a job, requeue a timed-out job (which then resumes
    from the checkpoint written on the launcher's signal) and signal it before the time limit."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from nora.results.sweep import CachedComposer, sweep_hydra

    with sweep_hydra():
        launcher = CachedComposer()("table1", ["hydra/launcher=slurm_1gpu"]).hydra.launcher
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0 and launcher.gpus_per_node == 1
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        launcher = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0


# ------------------------------------------------------------------- what nora reads back is checked (issue 23)
@pytest.mark.parametrize(
    "damage", ["numerator cut to 3", "coefficient edited", "recorded error edited", "other degrees", "NaN coefficient"]
)
@pytest.mark.slow  # 10 s here: end to end (make test-slow, CI)
def test_a_fit_cache_entry_that_is_not_what_it_claims_is_refitted(tmp_path, monkeypatch, damage):
    from nora.rational.fit import fit_rational

    monkeypatch.setenv("NORA_CACHE_DIR", str(tmp_path))
    good = fit_rational("gelu", form="A", degrees=(5, 4))
    [entry] = (tmp_path / "fits").glob("*.json")
    d = json.loads(entry.read_text())
    if damage == "numerator cut to 3":
        d["numerator"] = d["numerator"][:3]
    elif damage == "coefficient edited":
        d["numerator"][1] += 0.25
    elif damage == "recorded error edited":
        d["max_error"] = d["max_error"] / 10
    elif damage == "other degrees":
        d["degrees"] = [2, 4]
    else:
        d["denominator"][0] = float("nan")
    entry.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match=f"fit cache entry {re.escape(str(entry))} .*; refitting"):
        again = fit_rational("gelu", form="A", degrees=(5, 4))
    assert again.numerator == good.numerator and again.denominator == good.denominator
    assert again.max_error == good.max_error < 3e-3
    assert json.loads(entry.read_text())["numerator"] == good.numerator  # the entry is rewritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_rational("gelu", form="A", degrees=(5, 4)).numerator == good.numerator  # and trusted again


@pytest.mark.slow  # 17 s here: end to end (make test-slow, CI)
def test_a_refused_second_process_leaves_the_live_runs_hydra_record_alone(cifar10, tmp_path):
    """Two configurations raced into one run_name: the second is refused by the lock, and `.hydra/` still records
    the configuration and overrides the live run trains with (Hydra would have rewritten it before the job)."""
    overrides = tiny_overrides(cifar10, tmp_path, "nora", LONG + ["trainer.checkpoint_every=2"])
    run_dir = tmp_path / RUN_NAME
    with train_process(overrides + ["trainer.lr=0.001"], tmp_path) as first:
        wait_until(lambda: (run_dir / "checkpoints/last.pt").exists(), first, "the first checkpoint")
        record = {f: (run_dir / ".hydra" / f).read_text() for f in ("config.yaml", "overrides.yaml", "hydra.yaml")}
        assert OmegaConf.load(run_dir / ".hydra/config.yaml").trainer.lr == 0.001
        second = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides, "trainer.lr=0.002", f"run_name={RUN_NAME}"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2 and f"is in use by pid {first.pid}" in second.stderr
        assert first.poll() is None
    assert {f: (run_dir / ".hydra" / f).read_text() for f in record} == record
    assert OmegaConf.load(run_dir / ".hydra/config.yaml").trainer.lr == 0.001
    assert "trainer.lr=0.001" in OmegaConf.load(run_dir / ".hydra/overrides.yaml")
    assert OmegaConf.load(run_dir / "config.yaml").trainer.lr == 0.001


def test_the_loss_logged_after_a_resume_equals_the_uninterrupted_twins(cifar10, tmp_path):
    """Stopped at step 3 between two metrics lines (every 4 steps): the line at step 4 averages steps 1-4 as the
    twin's does, not only step 4."""
    base = tiny_overrides(cifar10, tmp_path, "nora", ["trainer.log_every=4", "trainer.checkpoint_every=1"])
    twin, resumed = tmp_path / "twin", tmp_path / "resumed"
    run_training(make_cfg(base), run_dir=twin)
    assert run_training(make_cfg(base + ["trainer.stop_after_steps=3"]), run_dir=resumed)["step"] == 3
    run_training(make_cfg(base), run_dir=resumed)
    losses = [{r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r} for d in (twin, resumed)]
    assert list(losses[0]) == [4, 8, 12] and losses[1] == losses[0]  # bitwise equal


def test_a_run_whose_adapter_was_deleted_is_not_complete_and_is_rebuilt_from_its_checkpoint(cifar10, tmp_path, logged):
    from nora.app.reload import load_trained_model

    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "nora", [])
    first = run_training(make_cfg(base), run_dir=run)
    saved = {p.name: p.read_bytes() for p in (run / "adapter").iterdir()}
    assert set(first["adapter"]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    shutil.rmtree(run / "adapter")
    with pytest.raises(UserError, match=f"{run}: no adapter/ directory"):
        load_trained_model(run)
    logged()
    again = run_training(make_cfg(base), run_dir=run)
    out = logged()
    assert (
        f"warning: {run}: summary.json says complete but {run / 'adapter'} is missing; training the run again "
        "from its last checkpoint"
    ) in out and "skip:" not in out
    assert {p.name: p.read_bytes() for p in (run / "adapter").iterdir()} == saved  # the same trained adapter
    assert again["steps"] == first["steps"] == 12 and again["adapter"] == first["adapter"]
    assert train_steps(run) == [2, 4, 6, 8, 10, 12]
    assert load_trained_model(run).adapter["kind"] == "nora"
    assert "skip:" in (run_training(make_cfg(base), run_dir=run) and logged())  # complete again


def test_an_adapter_that_is_not_the_runs_own_is_refused_by_name(cifar10, tmp_path):
    """A nora_pp run holding a plain LoRA adapter would be scored as LoRA with NoRA silently absent; a LoRA run
    holding another LoRA run's adapter (same shapes: LLaMA-3-8B, Mistral-7B and Qwen2-7B share them) would be
    scored under the wrong name. Both are refused before anything is loaded, naming the file."""
    from nora.app.reload import load_trained_model

    runs = {}
    for method, seed in (("nora_pp", 0), ("lora", 0), ("lora", 1)):
        runs[method, seed] = tmp_path / f"{method}_s{seed}"
        run_training(
            make_cfg(tiny_overrides(cifar10, tmp_path, method, ["trainer.epochs=1", f"seed={seed}"])),
            run_dir=runs[method, seed],
        )
    pp, lora0, lora1 = runs["nora_pp", 0], runs["lora", 0], runs["lora", 1]
    shutil.rmtree(pp / "adapter")
    shutil.copytree(lora0 / "adapter", pp / "adapter")
    with pytest.raises(UserError) as err:
        load_trained_model(pp)
    assert str(err.value).startswith(
        f"{pp / 'adapter'} holds a lora adapter, but method=nora_pp saves a nora++ adapter; not loading it"
    )
    shutil.copy(lora1 / "adapter/adapter_model.safetensors", lora0 / "adapter/adapter_model.safetensors")
    with pytest.raises(UserError) as err:
        load_trained_model(lora0)
    msg = str(err.value)
    assert msg.startswith(f"{lora0 / 'adapter/adapter_model.safetensors'} is not the file this run saved (sha256 ")
    assert "force=true" in msg and "\n" not in msg
    assert load_trained_model(lora1).adapter["kind"] == "lora"  # the run whose file it is loads it


@pytest.mark.slow  # 21 s here: end to end (make test-slow, CI)
def test_temp_files_of_interrupted_writes_are_removed_by_the_next_run(cifar10, tmp_path, logged):
    """Writers killed between writing a temp file and renaming it (kill -9 inside nora.files.atomic_path) leave
    `.last.pt.*.tmp` and `.metrics.jsonl.*.tmp`; the next process to hold the run removes them, and says so. A fresh
    temp file of mmlu.json (eval.py writes it without the lock) is spared, an hour-old one removed."""
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "linear_probe", ["trainer.checkpoint_every=2"])
    run_training(make_cfg(base + ["trainer.stop_after_steps=2"]), run_dir=run)
    for target in ("checkpoints/last.pt", "metrics.jsonl", "mmlu.json", "mmlu.json"):
        killed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, sys\nfrom nora.files import atomic_path\n"
                "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n"
                "    os.kill(os.getpid(), 9)",
                str(run / target),
            ],
            env=_env(),
        )
        assert killed.returncode == -signal.SIGKILL
    stale = sorted(run.glob(".*.tmp")) + sorted(run.glob("checkpoints/.*.tmp"))
    assert len(stale) == 4
    old_mmlu, young_mmlu = [p for p in stale if p.name.startswith(".mmlu.json.")]
    os.utime(old_mmlu, (time.time() - 7200, time.time() - 7200))
    logged()
    summary = run_training(make_cfg(base), run_dir=run)
    assert summary["steps"] == 12 and summary["status"] == "complete"
    line = next(ln for ln in logged().splitlines() if ln.startswith("removed"))
    assert line.startswith(f"removed 3 temp file(s) left in {run} by an interrupted write: ")
    assert sorted(p for p in stale if p.exists()) == [young_mmlu]


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["trainer.warmup_steps=1000"],
            "trainer.warmup_steps=1000 is more than the run's 12 steps: the peak learning rate would never be reached",
        ),
        (["method.nora.alpha=inf"], "method.nora.alpha=inf: must be a finite number"),
        (["trainer.lr=nan"], "trainer.lr=nan: must be a finite number"),
        ([f"seed={2**32}"], f"seed={2**32}: must be in [0, 2**32)"),
        (["trainer.device=cuda:abc"], "trainer.device='cuda:abc': valid: auto, cpu, cuda, cuda:N, mps"),
        (["dataset.limit_train=5"], "dataset.limit_train=5 is fewer than one batch (trainer.batch_size=32)"),
        (
            ["dataset=digits", "dataset.classes=[0,1,12]", "dataset.num_classes=3"],
            "dataset.classes=[0, 1, 12]: must be two or more distinct digits 0-9",
        ),
        (["run_name=../escaped"], "run_name='../escaped': must be one directory name under output_root"),
        (["run_name=a/b"], "run_name='a/b': must be one directory name under output_root"),
    ],
)
def test_bad_settings_are_one_line_before_training(cifar10, tmp_path, extra, message):
    digits = extra[0] == "dataset=digits"
    cfg = make_cfg(
        ["method=nora", "model=vit_test", "logger=disabled", f"output_root={tmp_path}", *extra]
        if digits
        else tiny_overrides(cifar10, tmp_path, "nora", extra)
    )
    with pytest.raises(UserError) as err:
        run_training(cfg, run_dir=tmp_path / "run")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_name_leaving_output_root_is_refused_before_hydra_writes(cifar10, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *tiny_overrides(cifar10, out, "nora"), "run_name=../escaped"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert error_lines(proc.stderr) == [
        "error: run_name='../escaped': must be one directory name under output_root "
        "(not empty, '.' or '..', no '/'); put runs in another folder with "
        "output_root"
    ]
    assert not (tmp_path / "escaped").exists()


def test_a_lock_that_is_a_directory_is_one_line(cifar10, tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        run_training(make_cfg(tiny_overrides(cifar10, tmp_path, "nora")), run_dir=tmp_path / "run")
    assert str(err.value) == (
        f"{tmp_path / 'run/.lock'} is a directory, not the run's lock file; remove it (it is not nora's) and run again"
    )


def test_a_full_disk_never_leaves_a_cut_figure(tmp_path):
    """activations.png on a full disk: one line with the path and errno, the previous figure unchanged, no 0-byte
    PNG and no temp file (a real 1 MB tmpfs, filled)."""
    from nora.plotting import pyplot, save_figure

    plt = pyplot()

    def figure():
        fig, ax = plt.subplots(figsize=(8, 6))
        ax.imshow(torch.rand(400, 400).numpy())  # noise: a PNG of a few hundred KB
        return fig

    with mounted(tmp_path / "disk", "size=1m") as disk:
        target = disk / "run" / "activations.png"
        save_figure(figure(), target)
        previous = target.read_bytes()
        assert previous[:8] == b"\x89PNG\r\n\x1a\n"
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - (16 << 10)))
        with pytest.raises(OutputError) as err:
            save_figure(figure(), target)
        assert str(err.value).startswith(f"cannot write {target}: [Errno 28] No space left on device")
        assert target.read_bytes() == previous and sorted(p.name for p in target.parent.iterdir()) == [target.name]
        target.unlink()  # and with no previous figure: the space it held filled again
        with open(disk / "filler2", "wb") as f:
            f.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - (16 << 10)))
        with pytest.raises(OutputError):
            save_figure(figure(), target)
        assert list(target.parent.iterdir()) == []  # no 0-byte activations.png


def test_every_file_a_run_writes_follows_the_umask(cifar10, tmp_path):
    """Group-readable under a group umask (027 -> 0640), never mkstemp's 0600: a colleague's tables can read it."""
    old = os.umask(0o027)
    try:
        run_training(make_cfg(tiny_overrides(cifar10, tmp_path, "nora", ["trainer.epochs=1"])), run_dir=tmp_path / "r")
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path / "r")): p.stat().st_mode & 0o777 for p in (tmp_path / "r").rglob("*") if p.is_file()
    }
    assert {
        "summary.json",
        "config.yaml",
        "metrics.jsonl",
        "activations.png",
        "checkpoints/last.pt",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    } <= set(modes)
    assert {f: oct(m) for f, m in modes.items() if m != 0o640} == {}


def _saved_small_vit_adapter(directory):
    """A NoRA adapter in the earlier nora_config.json format (nora still reads it; tests/legacy_formats.py)."""
    from legacy_formats import write_nora_files
    from test_adapter import small_vit

    import nora

    model = small_vit()
    nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    write_nora_files(model, directory)
    return directory


@pytest.mark.parametrize(
    "damage",
    [
        "truncated safetensors",
        "malformed nora_config.json",
        "config without layers",
        "a layer's tensor missing",
        "a wrong-shaped tensor",
        "NaN coefficients",
    ],
)
def test_a_damaged_nora_adapter_is_an_adapter_error_and_the_model_untouched(tmp_path, damage):
    """Real damaged files: load_nora raises AdapterError naming the file, and the model is as it was (a retry
    onto it works once the file is restored)."""
    from safetensors.torch import load_file, save_file
    from test_adapter import small_vit

    import nora

    adir = _saved_small_vit_adapter(tmp_path / "adapter")
    weights, config = adir / "nora_adapter.safetensors", adir / "nora_config.json"
    good = {p: p.read_bytes() for p in (weights, config)}
    tensors = load_file(str(weights))
    if damage == "truncated safetensors":
        weights.write_bytes(good[weights][: len(good[weights]) // 2])
        expected = f"{weights}: not a readable safetensors file"
    elif damage == "malformed nora_config.json":
        config.write_bytes(good[config][:-20])
        expected = f"{config}: not a readable NoRA config (JSONDecodeError"
    elif damage == "config without layers":
        meta = json.loads(good[config])
        del meta["layers"]
        config.write_text(json.dumps(meta))
        expected = f"{config}: not a NoRA config (missing or malformed: layers)"
    elif damage == "a layer's tensor missing":  # layer 0 complete, layer 1 without its update tensors
        save_file(
            {k: v for k, v in tensors.items() if not (k.startswith("blocks.1.") and "base_" not in k)}, str(weights)
        )
        expected = f"the NoRA adapter in {adir} does not fit (nothing was changed): blocks.1.mlp.act"
    elif damage == "a wrong-shaped tensor":
        key = next(k for k in tensors if k.startswith("blocks.1.") and "base_" not in k)
        save_file({**tensors, key: torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)}, str(weights))
        expected = f"the NoRA adapter in {adir} does not fit (nothing was changed): blocks.1.mlp.act"
    else:
        key = "blocks.2.mlp.act.base_denominator"
        save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, str(weights))
        expected = f"{weights}: 1 tensor(s) hold NaN or inf values ({key})"
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nora.AdapterError) as err:
        nora.load_nora(model, adir)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)
    assert not nora.nora_modules(model) and {n for n, m in model.named_modules() if type(m).__name__ == "GELU"} == {
        f"blocks.{i}.mlp.act" for i in range(3)
    }
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for p, data in good.items():  # restored: the same model takes it (no "already holds NoRA")
        p.write_bytes(data)
    nora.load_nora(model, adir)
    assert len(nora.nora_modules(model)) == 3


@pytest.mark.slow  # 65 s here: end to end (make test-slow, CI)
def test_a_truncated_compiled_kernel_is_rebuilt_not_a_sigbus(tmp_path):
    """A `.so` cut short under its BUILD_OK (a full disk, a killed copy of the cache) killed every run with SIGBUS:
    the library is checked against the size and sha256 its build recorded, and rebuilt with a warning."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    code = (
        "import torch, nora.kernels.cpu as c\n"
        "x = torch.linspace(-3, 3, 64).reshape(4, 16); a = torch.rand(2, 6); b = torch.rand(2, 4)\n"
        "y = c.rational_cpu(x, a, b, 'A'); ref = c.rational_torch(x, a, b, 'A')\n"
        "print('MAXDIFF', float((y - ref).abs().max()), c._module.__file__)\n"
    )
    env = {**_env(), "NORA_CACHE_DIR": str(tmp_path), "NORA_NO_BUILD": ""}

    def run():
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0 and "MAXDIFF" in first.stdout, first.stderr[-2000:]
    so = Path(first.stdout.split()[-1])
    record = json.loads((so.parent / "BUILD_OK").read_text())
    assert record["size"] == so.stat().st_size > 0
    so.write_bytes(so.read_bytes()[: record["size"] // 3])
    second = run()
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])  # was -7 (SIGBUS)
    assert (
        f"compiled kernel in {so.parent}: {so} is {record['size'] // 3} bytes, the build recorded "
        f"{record['size']}; rebuilding it"
    ) in second.stderr
    assert float(second.stdout.split()[1]) < 1e-5
    assert json.loads((so.parent / "BUILD_OK").read_text())["size"] == so.stat().st_size == record["size"]


@pytest.mark.parametrize(
    "method,file", [("lora", "adapter_model.safetensors"), ("linear_probe", "trainable.safetensors")]
)
def test_a_truncated_adapter_file_of_a_run_without_hashes_is_one_line(cifar10, tmp_path, method, file):
    """A run saved before summary.json recorded its adapter's hashes: a cut peft or trainable file is still one
    line naming it (not peft's or safetensors' own traceback)."""
    from nora.app.reload import load_trained_model

    run = tmp_path / "run"
    run_training(make_cfg(tiny_overrides(cifar10, tmp_path, method, ["trainer.epochs=1"])), run_dir=run)
    summary = json.loads((run / "summary.json").read_text())
    del summary["adapter"]
    (run / "summary.json").write_text(json.dumps(summary))
    path = run / "adapter" / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as err:
        load_trained_model(run)
    assert str(err.value).startswith(f"{path}: not a readable safetensors file (") and "\n" not in str(err.value)
