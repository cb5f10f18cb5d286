"""Train one configuration (or a sweep with -m). All logic lives in the `nora` library.

    python train.py method=nora dataset=cifar100
    python train.py -m method=lora,nora seed=0,1,2
"""
import sys

import hydra
from omegaconf import DictConfig

from nora.app.training import run_training  # also registers ${run_overrides:}, which the run directory's name uses
from nora.errors import user_errors


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
