"""What instruction data to load and how (``InstructDataConfig``), the datasets it knows, and its errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from nora.errors import UserError
from nora.files import cache_dir


class DataError(UserError, ValueError):
    """Instruction data that cannot be loaded as configured; the message says what to change."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The configured dataset (local path or hub dataset) is not available."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    hub_name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    template: str
    fmt: str  # how to lay out a local copy (error messages)
    may_be_null: tuple[str, ...] = ()  # required fields whose null reads as "" (the others must hold text)


SPECS = {
    "alpaca": DatasetSpec(
        hub_name="tatsu-lab/alpaca",
        required=("instruction", "input", "output"),
        optional=("text",),
        template="alpaca",
        fmt="a .json file holding a JSON list of records (as alpaca_data.json from the Stanford Alpaca repo), a "
        ".jsonl file with one record per line, a .parquet file, or a directory of such files or one written "
        "by datasets' save_to_disk; each record has the string fields instruction, input, output (input may "
        "be empty)",
        may_be_null=("input",),
    ),
    "openorca": DatasetSpec(
        hub_name="Open-Orca/OpenOrca",
        required=("system_prompt", "question", "response"),
        optional=("id",),
        template="chat",
        fmt="one or more .parquet files (as 1M-GPT4-Augmented.parquet of Open-Orca/OpenOrca), .json/.jsonl files, "
        "or a directory of them or one written by datasets' save_to_disk; each record has the string fields "
        "system_prompt, question, response (system_prompt may be empty; id is optional)",
        may_be_null=("system_prompt",),
    ),
}


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class InstructDataConfig:
    """What to load and how to tokenise it (the ``dataset=alpaca|openorca`` config group).

    name: ``alpaca`` | ``openorca``. path: local file or directory (None: the hub dataset ``hub_name``,
    default ``tatsu-lab/alpaca`` / ``Open-Orca/OpenOrca``). split: split to read. subset_size: keep at most
    this many rows (None: all), chosen by subset_strategy ``shuffle`` (seeded sample) or ``first``.
    max_length: tokens per example after truncation. min_response_tokens: response tokens kept when the
    prompt alone is too long. val_size: held-out rows for the validation loss (count, or fraction in (0, 1);
    0: no validation set). seed: subset and validation draw. template: ``alpaca`` | ``chat`` (None: the
    dataset's default). use_tokenizer_chat_template: ``chat`` uses the tokenizer's chat template if it has
    one. cache_dir: tokenised cache (None: ``$NORA_CACHE_DIR/instruct`` or ``~/.cache/nora/instruct``).
    packing: pack training examples into rows of max_length (default False: length-grouped batches).
    group_by_length: length-grouped training batches. pad_to_multiple_of: collator padding multiple (None: off).
    mega_batch_mult: global batches per length-sorted group.
    """

    name: str = "alpaca"
    path: str | None = None
    hub_name: str | None = None
    split: str = "train"
    subset_size: int | None = 100_000
    subset_strategy: str = "shuffle"
    max_length: int = 512
    min_response_tokens: int = 64
    val_size: int | float = 1000
    seed: int = 0
    template: str | None = None
    use_tokenizer_chat_template: bool = True
    cache_dir: str | None = None
    packing: bool = False
    group_by_length: bool = True
    pad_to_multiple_of: int | None = 8
    mega_batch_mult: int = 50

    def __post_init__(self):
        if self.path is not None:
            self.path = str(self.path)
            if self.path.strip() in ("", "null", "None"):
                self.path = None
        if self.pad_to_multiple_of is not None and int(self.pad_to_multiple_of) <= 0:
            self.pad_to_multiple_of = None
        for valid, problem in self._checks():
            if not valid:
                raise DataError(f"data config: {problem}")

    def _checks(self) -> list[tuple[bool, str]]:
        """(holds, what to change otherwise) for every constraint on the values, in the order they are reported."""
        v = self.val_size
        val_ok = (
            isinstance(v, (int, float)) and not isinstance(v, bool) and (0 <= v < 1 if isinstance(v, float) else v >= 0)
        )
        return [
            (self.name in SPECS, f"name={self.name!r} is not an instruction dataset; choose one of {sorted(SPECS)}"),
            (
                self.template in (None, "alpaca", "chat"),
                f"template={self.template!r}; choose alpaca or chat (or null for the dataset's default)",
            ),
            (
                self.subset_strategy in ("shuffle", "first"),
                f"subset_strategy={self.subset_strategy!r}; choose shuffle or first",
            ),
            (
                self.subset_size is None or int(self.subset_size) > 0,
                f"subset_size={self.subset_size}; use a positive count or null for all rows",
            ),
            (int(self.max_length) >= 2, f"max_length={self.max_length} is too small"),
            (int(self.min_response_tokens) >= 1, f"min_response_tokens={self.min_response_tokens} must be >= 1"),
            (val_ok, f"val_size={v!r}; use a count (0 for none) or a fraction in (0, 1)"),
            (int(self.mega_batch_mult) >= 1, f"mega_batch_mult={self.mega_batch_mult} must be >= 1"),
        ]

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None = None, ignore: Sequence[str] = (), **overrides
    ) -> "InstructDataConfig":
        """Build from a mapping (a plain dict or an OmegaConf DictConfig); unknown keys raise :class:`DataError`
        listing the valid ones. Keys in ``ignore`` (e.g. a config group's ``family``) are skipped."""
        try:
            from omegaconf import OmegaConf

            if d is not None and OmegaConf.is_config(d):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        d = {**dict(d or {}), **overrides}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in valid and k not in ignore)
        if unknown:
            raise DataError(f"data config: unknown key(s) {unknown}; valid keys: {valid}")
        return cls(**{k: v for k, v in d.items() if k in valid})

    @property
    def spec(self) -> DatasetSpec:
        return SPECS[self.name]

    @property
    def resolved_hub_name(self) -> str:
        return self.hub_name or self.spec.hub_name

    @property
    def resolved_template(self) -> str:
        return self.template or self.spec.template


def default_cache_dir() -> Path:
    return cache_dir("instruct")
