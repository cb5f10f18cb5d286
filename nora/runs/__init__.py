"""Run directories: where a training run writes, how it is named, who may write it, and how it is loaded back.

==============  ================================================================================================
``layout``      the paths of a run directory (``RunDir``) and reading/writing ``summary.json`` and ``config.yaml``:
                the one module that names them
``lock``        one process per run directory (``RunLock``)
``naming``      the ``${run_overrides:}`` resolver: a run name for every distinct configuration of a sweep
``load``        the model a finished run trained: base model from its ``config.yaml`` plus its ``adapter/``
``writable``    the Hydra callback that checks the output directory before Hydra writes there
==============  ================================================================================================

The loading API is re-exported here: ``from nora.runs import load_trained_model``.
"""
from nora.runs.load import (FULL_FILE, NORA_FILES, PEFT_FILES, TrainedModel, adapter_identity, apply_adapter,
                            build_base_model, find_adapter_dir, load_trained_model, read_run_config, resolve_adapter)

__all__ = ["FULL_FILE", "NORA_FILES", "PEFT_FILES", "TrainedModel", "adapter_identity", "apply_adapter",
           "build_base_model", "find_adapter_dir", "load_trained_model", "read_run_config", "resolve_adapter"]
