"""MMLU evaluation of a base model or a training run's model. All logic lives in the `nora` library.

python eval.py run_dir=runs/<training run>
python eval.py model=llama3_8b mmlu.path=data/mmlu
"""

import sys


def _interrupted_while_starting():
    """Ctrl-C while torch & co. load or Hydra composes: one line, no traceback."""
    print("interrupted while starting; nothing was written", file=sys.stderr, flush=True)
    sys.exit(130)


try:
    import hydra
    from omegaconf import DictConfig

    from nora.app.evaluation import run_eval
    from nora.errors import user_errors
except KeyboardInterrupt:
    _interrupted_while_starting()


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_eval(cfg)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        _interrupted_while_starting()
