"""Run directories: where a training run writes, how it is named, who may write it, what identifies its result.

==============  ================================================================================================
``layout``      the paths of a run directory (``RunDir``) and reading/writing ``summary.json`` and ``config.yaml``:
                the one module that names them
``identity``    what determines a run's result: ``result_config``, ``config_hash``, ``config_differences``
``lock``        one process per run directory (``RunLock``)
``naming``      the ``${run_overrides:}`` resolver: a run name for every distinct configuration of a sweep
``logger``      ``metrics.jsonl`` and the W&B run of a run directory (``RunLogger``), the ``logger`` schema
``writable``    the Hydra callback that checks the output directory before Hydra writes there
==============  ================================================================================================

Reloading a finished run's model is the application's (:mod:`nora.app.reload`).
"""
