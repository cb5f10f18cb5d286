"""NoRA as a peft method (``peft_type`` ``NORA``): ``peft.get_peft_model(model, nora.NoraPeftConfig(...))``.

Importing this package (``import nora`` does, wherever peft is installed) extends peft's ``PeftType`` with ``NORA``
and registers the method, so peft's own ``get_peft_model``, ``save_pretrained``, ``PeftConfig.from_pretrained``,
``PeftModel.from_pretrained``, ``merge_and_unload``, ``disable_adapter`` and ``set_adapter`` work on it.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from nora.tuner.config import NoraPeftConfig, extend_peft_type
from nora.tuner.convert import peft_config_of
from nora.tuner.layer import NoraLayer
from nora.tuner.model import PREFIX, NoraModel, calibrate, nora_layers

if PeftType.NORA not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="nora", config_cls=NoraPeftConfig, model_cls=NoraModel, prefix=PREFIX)

__all__ = [
    "NoraPeftConfig",
    "NoraModel",
    "NoraLayer",
    "calibrate",
    "nora_layers",
    "extend_peft_type",
    "peft_config_of",
]
