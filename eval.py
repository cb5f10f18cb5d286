"""MMLU evaluation of a base model or a training run's model. All logic lives in the `nora` library.

    python eval.py run_dir=runs/<training run>
    python eval.py model=llama3_8b mmlu.path=data/mmlu
"""
import sys

import hydra
from omegaconf import DictConfig

from nora.app.evaluation import run_eval
from nora.errors import user_errors


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_eval(cfg)


if __name__ == "__main__":
    sys.exit(main())
