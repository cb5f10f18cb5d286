"""The application: what ``train.py`` and ``eval.py`` run, built on the library and the building blocks.

==============  ================================================================================================
``config``      the composed ``train`` config as a typed, checked ``RunConfig`` (``validate``); ``compose``
``setup/``      what one run trains, per model family (``TrainSetup``: model, task, data, calibration, wrap)
``training``    one training run: ``run_training(cfg)`` (validate, lock, skip or resume, setup, method, train, write)
``adapters``    a run's adapter directory: write it, find it, say what it holds, load it onto a base model
``reload``      the model a finished run trained (``load_trained_model``)
``evaluation``  the job ``eval.py`` runs: MMLU of a base model or of a run (``run_eval``)
``publish``     a run on the Hugging Face Hub: ``push_to_hub`` with a generated model card
==============  ================================================================================================
"""
