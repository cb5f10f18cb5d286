"""MMLU data: the 57 subjects, their categories, and readers for the two layouts in use.

Layouts (``source``):

``csv``
    The original release (https://people.eecs.berkeley.edu/~hendrycks/data.tar, unpacked as
    ``data/``): ``<root>/{dev,val,test}/<subject>_{dev,val,test}.csv``, no header, columns
    question, A, B, C, D, answer letter. ``<root>`` may also be the folder holding ``data/``.
``hf``
    The Hugging Face dataset ``cais/mmlu`` (columns question, subject, choices, answer 0-3), as

    * the hub name ``cais/mmlu`` (read with ``datasets.load_dataset``; uses the local HF cache
      when offline),
    * a copy of the hub repository (or its HF-cache snapshot folder): parquet files
      ``<root>/<subject>/{dev,test}-*.parquet`` or ``<root>/all/{dev,test}-*.parquet``
      (``all`` rows are split by their ``subject`` column, order kept),
    * a folder written by ``datasets`` ``save_to_disk``: a ``DatasetDict`` with ``dev``/``test``
      splits at ``<root>``, ``<root>/all`` or ``<root>/<subject>``.

``source="auto"`` (default) picks ``csv`` when ``<root>/test`` (or ``<root>/data/test``) holds
``*_test.csv`` files and ``hf`` otherwise. Few-shot examples are taken from the ``dev`` split in
file order (that is what lm-evaluation-harness's ``first_n`` sampler does).

Categories come from ``nora/resources/mmlu_subjects.json`` (the original release's
``categories.py``); ``grouping="lm_eval"`` moves ``anatomy`` to STEM as lm-evaluation-harness does.

**Other benchmarks in MMLU's layout.** A CSV root that holds a ``subjects.json``
(``{"<subject>": {"category": "<category>"}, ...}``) is a benchmark of its own: its subjects replace the 57 and
its categories (in the file's order) replace MMLU's four, for ``subjects``, ``available`` and the per-category
accuracies alike (the offline LLM demo's questions, :mod:`nora.data.world`, are one).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

CATEGORIES = ("STEM", "humanities", "social_sciences", "other")
GROUPINGS = ("original", "lm_eval")
SOURCES = ("auto", "csv", "hf")
LETTERS = ("A", "B", "C", "D")
HUB_NAME = "cais/mmlu"
DATA_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
SUBJECTS_FILE = "subjects.json"  # a custom benchmark's {subject: {"category": ...}} (see the module docstring)
_SPLIT_ALIASES = {"val": "validation", "validation": "validation", "dev": "dev", "test": "test"}


@dataclass(frozen=True)
class MMLUQuestion:
    """One question: ``choices`` are the four answer texts, ``answer`` is 0-3 (A-D)."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


@dataclass
class SubjectData:
    """A subject's few-shot pool (``dev``, in file order) and evaluation questions (``test``)."""

    subject: str
    test: list[MMLUQuestion]
    dev: list[MMLUQuestion] = field(default_factory=list)
    test_path: str = ""
    dev_path: str = ""


# ------------------------------------------------------------------------------- subjects
@lru_cache(maxsize=1)
def subject_table() -> dict[str, dict[str, str]]:
    """``{subject: {"category": ..., "subcategory": ...}}`` for the 57 subjects (original grouping)."""
    path = Path(__file__).resolve().parent.parent / "resources" / "mmlu_subjects.json"
    return json.loads(path.read_text())


def custom_subjects(path: str | os.PathLike | None) -> dict[str, dict[str, str]] | None:
    """The ``subjects.json`` of a benchmark in MMLU's CSV layout at ``path`` (``{subject: {"category": ...}}``, in
    the file's order), or None when ``path`` is MMLU itself."""
    if path is None:
        return None
    p = Path(path).expanduser()
    root = _csv_root(p) if p.is_dir() else None
    for cand in ([root] if root is not None else []) + [p]:
        f = cand / SUBJECTS_FILE
        if f.is_file():
            try:
                table = json.loads(f.read_text(encoding="utf-8-sig"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{f}: not a readable JSON file ({exc})") from None
            if (
                not isinstance(table, dict)
                or not table
                or not all(isinstance(v, dict) and isinstance(v.get("category"), str) for v in table.values())
            ):
                raise ValueError(
                    f'{f}: expected {{"<subject>": {{"category": "<category>"}}, ...}} with at least one subject'
                )
            return table
    return None


def known_subjects(path: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """The subject table that applies to the data at ``path``: its ``subjects.json`` or MMLU's 57."""
    return custom_subjects(path) or subject_table()


def all_subjects(path: str | os.PathLike | None = None) -> list[str]:
    return sorted(known_subjects(path))


def category_names(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The categories of the benchmark at ``path``: MMLU's four, or a ``subjects.json``'s in order of appearance."""
    custom = custom_subjects(path)
    return tuple(dict.fromkeys(v["category"] for v in custom.values())) if custom else CATEGORIES


def subject_categories(grouping: str = "original", path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{subject: category}``; ``grouping`` is ``original`` (default) or ``lm_eval`` (anatomy -> STEM); a
    benchmark with its own ``subjects.json`` at ``path`` has its own categories (``grouping`` does not apply)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown MMLU grouping {grouping!r}; valid: {', '.join(GROUPINGS)}")
    custom = custom_subjects(path)
    if custom:
        return {s: v["category"] for s, v in custom.items()}
    cats = {s: v["category"] for s, v in subject_table().items()}
    if grouping == "lm_eval":
        cats["anatomy"] = "STEM"
    return cats


def resolve_subjects(subjects: str | Iterable[str] | None, path: str | os.PathLike | None = None) -> list[str]:
    """Validate a subject selection (``None``/``"all"`` = all 57, or all of ``path``'s ``subjects.json``; a
    comma-separated string is split)."""
    custom = custom_subjects(path)
    known = custom or subject_table()
    if subjects is None or subjects == "all":
        return sorted(known)
    if subjects == "available":
        raise ValueError("subjects='available' needs the data location; use load_mmlu / available_subjects")
    if isinstance(subjects, str):
        subjects = [s.strip() for s in subjects.split(",") if s.strip()]
    out: list[str] = []
    for s in subjects:
        s = str(s).strip().replace(" ", "_")
        if s not in known:
            close = difflib.get_close_matches(s, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            if custom:
                raise ValueError(
                    f"unknown subject {s!r}{hint}; valid (from {path}/{SUBJECTS_FILE}): {', '.join(sorted(known))}"
                )
            raise ValueError(
                f"unknown MMLU subject {s!r}{hint}; valid subjects are the 57 keys of "
                f"nora/resources/mmlu_subjects.json, e.g. abstract_algebra, anatomy, "
                f"high_school_biology"
            )
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("empty MMLU subject selection; give subject names or leave it unset for all of them")
    return out


# ------------------------------------------------------------------------------- layouts
def _expected_layouts(root: str | os.PathLike) -> str:
    return (
        f"expected the original CSV layout {root}/{{dev,test}}/<subject>_{{dev,test}}.csv (from {DATA_URL}, "
        f"unpacked) or a {HUB_NAME} copy ({root}/<subject>/{{dev,test}}-*.parquet or {root}/all/..., "
        f"or a datasets save_to_disk folder), or path={HUB_NAME} with source=hf to read from the hub"
    )


def _csv_root(root: Path) -> Path | None:
    for cand in (root, root / "data"):
        if (cand / "test").is_dir() and any((cand / "test").glob("*_test.csv")):
            return cand
    return None


def detect_source(path: str | os.PathLike) -> str:
    """``csv`` or ``hf`` for a data location; raises FileNotFoundError when there is nothing there."""
    p = Path(path).expanduser()
    if not p.exists():
        if str(path).strip("/") == HUB_NAME:
            return "hf"  # the hub dataset id (another hub id needs source=hf)
        raise FileNotFoundError(f"MMLU data directory not found: {p}; {_expected_layouts(p)}")
    if not p.is_dir():
        raise FileNotFoundError(f"MMLU data path {p} is not a directory; {_expected_layouts(p)}")
    if _csv_root(p) is not None:
        return "csv"
    if (p / "dataset_dict.json").exists() or any(p.glob("*/*.parquet")) or any(p.glob("*/dataset_dict.json")):
        return "hf"
    raise FileNotFoundError(f"no MMLU data found in {p}; {_expected_layouts(p)}")


def _read_csv(path: Path, subject: str) -> list[MMLUQuestion]:
    data = path.read_bytes()
    try:  # utf-8-sig: a byte-order mark written by a spreadsheet program is not part of the first question
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # the original release is UTF-8; a file re-saved by a spreadsheet program is often latin-1 / cp1252
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte "
            f"0x{data[exc.start]:02x} at offset {exc.start}); the MMLU CSV files are UTF-8, re-encode "
            f"this one (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    out = []
    for i, row in enumerate(rows):
        if not row:
            continue
        if len(row) != 6:
            raise ValueError(f"{path}, row {i + 1}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        letter = row[5].strip().upper()
        if letter not in LETTERS:
            raise ValueError(f"{path}, row {i + 1}: answer must be one of A/B/C/D, got {row[5]!r}")
        out.append(MMLUQuestion(subject, row[0], tuple(row[1:5]), LETTERS.index(letter)))
    return out


def _csv_folder(split: str) -> str:
    return "val" if split == "validation" else split


def _csv_path(root: Path, subject: str, split: str) -> Path:
    folder = _csv_folder(split)
    return root / folder / f"{subject}_{folder}.csv"


def _warn_unknown_csvs(root: Path, splits: Iterable[str]) -> None:
    """Warn about CSV files in the split folders that are none of the known subjects (they are not read)."""
    unknown = []
    table = known_subjects(root)
    for split in splits:
        folder = root / _csv_folder(split)
        known = {_csv_path(root, s, split).name for s in table}
        unknown += sorted(str(f.relative_to(root)) for f in folder.glob("*.csv") if f.name not in known)
    if unknown:
        where = f" of {SUBJECTS_FILE}" if custom_subjects(root) else ""
        warnings.warn(
            f"MMLU: {len(unknown)} CSV file(s) in {root} are not among the {len(table)} subjects{where} "
            "and are ignored: "
            f"{', '.join(unknown)}",
            stacklevel=3,
        )


def _load_csv(root: Path, subject: str, split: str) -> tuple[list[MMLUQuestion], str]:
    path = _csv_path(root, subject, split)
    if not path.exists():
        raise FileNotFoundError(
            f"MMLU {split} file for subject {subject!r} not found: {path}; expected the original CSV layout "
            f"{root}/{{dev,test}}/<subject>_{{dev,test}}.csv (from {DATA_URL}) or a {HUB_NAME} copy "
            f"(source=hf)"
        )
    return _read_csv(path, subject), str(path)


def _rows_to_questions(rows: Iterable[dict], subject: str, where: str) -> list[MMLUQuestion]:
    out = []
    for i, r in enumerate(rows):
        choices = list(r["choices"])
        ans = r["answer"]
        if isinstance(ans, str):
            ans = LETTERS.index(ans.strip().upper()) if ans.strip().upper() in LETTERS else int(ans)
        if len(choices) != 4 or not 0 <= int(ans) <= 3:
            raise ValueError(
                f"{where}, row {i}: expected 4 choices and answer 0-3, got {len(choices)} choices and answer {ans!r}"
            )
        out.append(MMLUQuestion(subject, r["question"], tuple(choices), int(ans)))
    return out


class _HFReader:
    """Reads subjects from a cais/mmlu copy (parquet tree, save_to_disk folder) or the hub."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = Path(path).expanduser()
        self.root = p if p.exists() else None
        self._all_cache: dict[str, tuple[list[dict], str]] = {}

    def _parquet_files(self, folder: Path, split: str) -> list[Path]:
        names = [split] + (["val"] if split == "validation" else [])
        return sorted(f for n in names for f in folder.glob(f"{n}-*.parquet")) + sorted(
            f for n in names for f in folder.glob(f"{n}.parquet")
        )

    def _read_parquet(self, files: list[Path]) -> list[dict]:
        import pyarrow.parquet as pq

        rows: list[dict] = []
        for f in files:
            rows.extend(pq.read_table(f, columns=None).to_pylist())
        return rows

    def _read_saved(self, folder: Path, split: str) -> list[dict] | None:
        from datasets import load_from_disk

        if not (folder / "dataset_dict.json").exists():
            return None
        dd = load_from_disk(str(folder))
        if split not in dd:
            return None
        return dd[split].to_list()

    def _all_rows(self, split: str) -> tuple[list[dict], str] | None:
        assert self.root is not None
        if split in self._all_cache:
            return self._all_cache[split]
        for folder in (self.root / "all", self.root):
            files = self._parquet_files(folder, split)
            rows = self._read_parquet(files) if files else self._read_saved(folder, split)
            if rows is not None:
                self._all_cache[split] = (rows, str(folder))
                return rows, str(folder)
        return None

    def load(self, subject: str, split: str) -> tuple[list[MMLUQuestion], str]:
        if self.root is None:
            return self._load_hub(subject, split)
        folder = self.root / subject
        files = self._parquet_files(folder, split)
        if files:
            return _rows_to_questions(self._read_parquet(files), subject, str(folder)), str(folder)
        rows = self._read_saved(folder, split)
        if rows is not None:
            return _rows_to_questions(rows, subject, str(folder)), str(folder)
        got = self._all_rows(split)
        if got is not None:
            rows, where = got
            if rows and "subject" not in rows[0]:
                raise ValueError(
                    f"{where}: the {split} rows have no 'subject' column, so they cannot be split "
                    f"by subject; put each subject in {self.root}/<subject>/"
                )
            picked = [r for r in rows if r["subject"] == subject]
            if picked:
                return _rows_to_questions(picked, subject, where), where
        raise FileNotFoundError(
            f"MMLU {split} split for subject {subject!r} not found in {self.root}; expected "
            f"{self.root}/{subject}/{split}-*.parquet, {self.root}/all/{split}-*.parquet holding rows with "
            f"subject={subject!r}, or a datasets save_to_disk folder at {self.root}/{subject} (a {HUB_NAME} "
            f"copy), or the original CSV layout {self.root}/{{dev,test}}/<subject>_{{dev,test}}.csv "
            f"(from {DATA_URL}, source=csv)"
        )

    def _load_hub(self, subject: str, split: str) -> tuple[list[MMLUQuestion], str]:
        from datasets import load_dataset

        try:
            ds = load_dataset(self.path, subject, split=split)
        except Exception as e:  # offline without a cache, unknown repo, ...
            raise FileNotFoundError(
                f"could not load MMLU subject {subject!r} split {split!r} from the hub dataset {self.path!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); when offline, point the "
                f"path at a local copy: {_expected_layouts('<dir>')}"
            ) from None
        return _rows_to_questions(ds.to_list(), subject, f"{self.path}:{subject}"), f"{self.path}:{subject}"


def available_subjects(path: str | os.PathLike, source: str = "auto", split: str = "test") -> list[str]:
    """The known subjects whose ``split`` is present at ``path`` (all 57 for the hub)."""
    split = _SPLIT_ALIASES.get(split, split)
    if source == "auto":
        source = detect_source(path)
    p = Path(path).expanduser()
    if not p.exists():
        return all_subjects()  # hub
    if source == "csv":
        root = _csv_root(p) or p
        return [s for s in all_subjects(p) if _csv_path(root, s, split).exists()]
    reader = _HFReader(p)
    found = []
    for s in all_subjects():
        try:
            reader.load(s, split)
        except FileNotFoundError:
            continue
        found.append(s)
    return found


def load_mmlu(
    path: str | os.PathLike,
    source: str = "auto",
    subjects: str | Sequence[str] | None = None,
    k: int = 5,
    split: str = "test",
) -> dict[str, SubjectData]:
    """Read the evaluation split (``test`` by default) and, when ``k > 0``, the ``dev`` split.

    ``subjects``: ``None``/``"all"`` (all 57, each must be present), a list or comma-separated string
    of names, or ``"available"`` (whichever known subjects the data holds; at least one).
    Returns ``{subject: SubjectData}`` in sorted subject order. Raises ``FileNotFoundError`` naming the
    missing path and the expected layouts, or ``ValueError`` for an unknown subject/source, a file that is
    not UTF-8 or a malformed row (naming the file). CSV files that are none of the 57 subjects are listed in
    a warning.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown MMLU source {source!r}; valid: {', '.join(SOURCES)}")
    split = _SPLIT_ALIASES.get(split, split)
    if split not in ("test", "validation", "dev"):
        raise ValueError(f"unknown MMLU split {split!r}; valid: test, val (validation), dev")
    if source == "auto":
        source = detect_source(path)
    if subjects == "available":
        chosen = available_subjects(path, source, split)
        if not chosen:
            raise FileNotFoundError(f"no MMLU subject found in {path}; {_expected_layouts(path)}")
    else:
        chosen = resolve_subjects(subjects, path if source == "csv" else None)
    load = _load_from_csv if source == "csv" else _load_from_hf
    out = load(path, chosen, split, k)
    _check_sizes(out, split, k)
    return out


def _load_from_csv(path: str | os.PathLike, chosen: list[str], split: str, k: int) -> dict[str, SubjectData]:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"MMLU data directory not found: {p}; {_expected_layouts(p)}")
    root = _csv_root(p) or p
    missing = [s for s in chosen if not _csv_path(root, s, split).exists()]
    if len(missing) > 1:
        raise FileNotFoundError(
            f"MMLU {split} files for {len(missing)} of the {len(chosen)} requested subjects are missing in "
            f"{root} (first: {_csv_path(root, missing[0], split)}; missing: {', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}); expected the original CSV layout "
            f"{root}/{{dev,test}}/<subject>_{{dev,test}}.csv (from {DATA_URL}) or a {HUB_NAME} copy (source=hf); "
            f"or select subjects (subjects=[...] or subjects=available)"
        )
    _warn_unknown_csvs(root, dict.fromkeys([split] + (["dev"] if k > 0 else [])))
    out: dict[str, SubjectData] = {}
    for s in chosen:
        test, tpath = _load_csv(root, s, split)
        dev, dpath = _load_csv(root, s, "dev") if k > 0 else ([], "")
        out[s] = SubjectData(s, test, dev, tpath, dpath)
    return out


def _load_from_hf(path: str | os.PathLike, chosen: list[str], split: str, k: int) -> dict[str, SubjectData]:
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise FileNotFoundError(f"MMLU data path {p} is not a directory; {_expected_layouts(p)}")
    if not p.exists() and (p.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") != 1):
        raise FileNotFoundError(f"MMLU data directory not found: {p}; {_expected_layouts(p)}")
    reader = _HFReader(path)
    out: dict[str, SubjectData] = {}
    for s in chosen:
        test, tpath = reader.load(s, split)
        dev, dpath = reader.load(s, "dev") if k > 0 else ([], "")
        out[s] = SubjectData(s, test, dev, tpath, dpath)
    return out


def _check_sizes(data: dict[str, SubjectData], split: str, k: int) -> None:
    for s, d in data.items():
        if not d.test:
            raise ValueError(f"MMLU subject {s!r} has no {split} questions in {d.test_path}")
        if k > len(d.dev):
            raise ValueError(
                f"MMLU subject {s!r}: k={k} shots requested but its dev split ({d.dev_path}) holds "
                f"only {len(d.dev)} questions; use k <= {len(d.dev)}"
            )
