"""Benchmarks: ``python -m nora.bench <subcommand>``.

Subcommands
-----------
``kernels``  rational-activation backends vs GELU / SiLU, forward and forward+backward, saved bytes,
             memory-bandwidth floor (:mod:`nora.bench.kernels`); JSON under ``results/``.
``train``    training-step benchmark (:mod:`nora.bench.train_step`, imported lazily; the module
             provides ``main(argv: list[str]) -> int``).
"""
