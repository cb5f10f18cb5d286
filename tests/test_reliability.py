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
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nora.runs.identity import config_hash
from nora.errors import NonFiniteLossError, OutputError, UserError
from nora.app.training import run_training
from nora.runs.logger import read_metrics
from fixtures import write_cifar
from test_train_vision import make_cfg, tiny_overrides

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
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={RUN_NAME}"],
                                cwd=tmp_path, env=_env(), stdout=o, stderr=e,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(cifar10, tmp_path, capsys):
    overrides = tiny_overrides(cifar10, tmp_path, "nora", LONG + ["trainer.checkpoint_every=2"])
    run_dir = tmp_path / RUN_NAME
    with train_process(overrides, tmp_path) as first:
        wait_until(lambda: (run_dir / "checkpoints/last.pt").exists(), first, "the first checkpoint")
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={RUN_NAME}"],
                                cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr + second.stdout
        assert lines[0].startswith(f"error: {run_dir} is in use by pid {first.pid} on {socket.gethostname()} "
                                   f"(since {holder['since']})")
        assert first.poll() is None  # the owner goes on
        steps = train_steps(run_dir)
        assert steps == list(range(1, len(steps) + 1))  # one writer: every step once
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it, the file stays
        first.wait(timeout=60)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid
    stopped_at = ckpt_step(run_dir)
    resumed = run_training(make_cfg(overrides + ["trainer.stop_after_steps=1"]), run_dir=run_dir)
    out = capsys.readouterr().out
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


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno

    from nora.runs import lock as run_lock

    def no_locks(fd, op):  # what flock raises on NFS/Lustre mounts without lock support
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with run_lock.RunLock(tmp_path / "run"):
        pass
    assert capsys.readouterr().out.startswith(f"warning: cannot lock {tmp_path / 'run/.lock'} ([Errno 37] No locks")


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
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
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
def test_keep_records_the_configuration_the_resumed_run_uses(cifar10, tmp_path, capsys):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "nora", ["trainer.checkpoint_every=2"])
    part = run_training(make_cfg(base + ["trainer.stop_after_steps=3"]), run_dir=run)
    assert part == {"status": "incomplete", "step": 3}
    kept = run_training(make_cfg(base + ["trainer.lr=1e6", "on_config_change=keep"]), run_dir=run)
    assert "on_config_change=keep uses it as it is" in capsys.readouterr().out
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


def test_a_half_written_metrics_line_is_dropped_on_resume(cifar10, tmp_path, capsys):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "linear_probe", ["trainer.checkpoint_every=2", "trainer.log_every=1"])
    run_training(make_cfg(base + ["trainer.stop_after_steps=4"]), run_dir=run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0, "loss": 2.3')  # power lost mid-line
    assert train_steps(run) == [1, 2, 3, 4]  # readers skip it too
    summary = run_training(make_cfg(base), run_dir=run)
    assert f"warning: {run / 'metrics.jsonl'}: dropped the half-written last line" in capsys.readouterr().out
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
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(cifar10, ro, "nora"),
                               f"run_name={RUN_NAME}"],
                              cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert error_lines(proc.stderr) == [f"error: cannot write {ro / RUN_NAME}: [Errno 30] Read-only file system"]


def test_user_errors_turns_refused_writes_and_ctrl_c_into_one_line(capsys):
    import errno

    from nora.errors import user_errors

    cases = [(OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.jsonl"), 2,
              "error: /runs/r/metrics.jsonl: [Errno 28] No space left on device"),
             (OSError(errno.EROFS, "Read-only file system"), 2, "error: [Errno 30] Read-only file system"),
             (OutputError("cannot write /runs/r/summary.json: [Errno 28] No space left on device"), 2,
              "error: cannot write /runs/r/summary.json: [Errno 28] No space left on device"),
             (KeyboardInterrupt(), 130, "interrupted; run the same command to continue")]
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
    m = re.fullmatch(r"interrupted at step (\d+); last checkpoint at step (\d+); run the same command to resume",
                     lines[0])
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


def test_sigterm_writes_a_checkpoint_at_the_current_step(cifar10, tmp_path, capsys):
    overrides = tiny_overrides(cifar10, tmp_path, "nora", LONG + ["trainer.checkpoint_every=1000"])
    run_dir = tmp_path / RUN_NAME
    with train_process(overrides, tmp_path) as proc:
        wait_until(lambda: len(train_steps(run_dir)) >= 5, proc, "five steps")
        proc.send_signal(signal.SIGTERM)  # what SLURM sends at preemption and at the time limit
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    lines = error_lines(proc.err.read_text())
    m = re.fullmatch(r"stopped by SIGTERM at step (\d+); checkpoint written at step (\d+); run the same command to "
                     r"resume", lines[-1] if lines else "")
    assert m and m[1] == m[2], lines
    step = int(m[1])
    assert step >= 5 and ckpt_step(run_dir) == step and train_steps(run_dir)[-1] == step
    resumed = run_training(make_cfg(overrides + ["trainer.stop_after_steps=1"]), run_dir=run_dir)
    assert f"at step {step} (epoch" in capsys.readouterr().out and resumed["step"] == step + 1


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
            run_training(make_cfg(tiny_overrides(cifar10, tmp_path, "nora", ["trainer.checkpoint_every=1000"])),
                         run_dir=run)
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
