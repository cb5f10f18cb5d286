"""Train one configuration (or a sweep with -m). All logic lives in the `nora` library.

python train.py method=nora dataset=cifar100
python train.py -m method=lora,nora seed=0,1,2
"""

import signal
import sys


def _stopped_while_starting(signum=signal.SIGINT, frame=None):
    """Ctrl-C or SIGTERM while torch & co. load or Hydra composes, before run_training: one line, no traceback."""
    print(
        f"{'interrupted' if signum == signal.SIGINT else f'stopped by {signal.Signals(signum).name}'} while "
        "starting; nothing was written",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stopped_while_starting)
try:
    import hydra
    from omegaconf import DictConfig

    from nora.app.training import run_training  # also registers ${run_overrides:}, which the run directory's name uses
    from nora.errors import user_errors
except KeyboardInterrupt:
    _stopped_while_starting()
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # run_training handles it from here (nora.train.signals)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_training(cfg)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # while Hydra composes (inside run_training, user_errors says where it stopped)
        _stopped_while_starting()
