"""Data pipelines: ``nora.data.vision`` (image classification), ``nora.data.instruct`` (instruction tuning
for causal LMs), ``nora.data.sampling`` (shared resumable batch sampling).

The instruction-data API is re-exported lazily (importing ``nora.data`` imports nothing else)::

    from nora.data import InstructDataConfig, build_instruct_datasets, InstructCollator, LengthGroupedBatchSampler
"""

from __future__ import annotations

from nora.data import instruct

_INSTRUCT = (
    "InstructDataConfig",
    "build_instruct_datasets",
    "build_dataloader",
    "InstructCollator",
    "InstructDataset",
    "PackedInstructDataset",
    "LengthGroupedBatchSampler",
    "tokens_in_batch",
    "DataError",
    "DataNotFoundError",
)

__all__ = list(_INSTRUCT)


def __getattr__(name: str):
    if name in _INSTRUCT:
        return getattr(instruct, name)
    raise AttributeError(f"module 'nora.data' has no attribute {name!r}")
