"""Small MMLU-format fixtures written by the tests: the original CSV layout and cais/mmlu-style copies.

A fixture is ``{subject: {"dev": [row, ...], "test": [row, ...]}}`` with rows
``(question, [A, B, C, D], answer 0-3)``. The writers produce

* ``write_csv``: ``<root>/{dev,val,test}/<subject>_{dev,val,test}.csv`` (no header, answer letter),
  like the original release;
* ``write_parquet``: ``<root>/<subject>/{dev,validation,test}-00000-of-00001.parquet`` (``layout=
  "subject"``) or ``<root>/all/...`` (``layout="all"``) with columns question, subject, choices,
  answer, like the ``cais/mmlu`` hub repository;
* ``write_saved``: a ``datasets.DatasetDict`` ``save_to_disk`` folder per subject (or ``all``).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

LETTERS = "ABCD"
FIXTURE_SUBJECTS = ("abstract_algebra", "anatomy", "high_school_biology", "philosophy")
_WORDS = (
    "cell energy force mass velocity group field ring law history economics philosophy degree "
    "polynomial protein gene bone muscle nerve virtue ethics logic argument truth value answer "
    "capital model theory ratio prime order"
).split()


def make_fixture(
    subjects=FIXTURE_SUBJECTS,
    n_dev: int = 5,
    n_test: int | dict = 6,
    seed: int = 0,
    answers: dict | None = None,
    long_words: int = 0,
) -> dict:
    """Deterministic random questions. ``answers`` may fix each subject's test answer letters
    (a string like ``"AABD"``, which also sets that subject's test size); ``long_words`` pads each
    question with that many extra words (to make prompts long)."""
    rng = random.Random(seed)
    fixture = {}
    for s in subjects:
        splits = {}
        n_t = n_test[s] if isinstance(n_test, dict) else n_test
        fixed = (answers or {}).get(s)
        if fixed is not None:
            n_t = len(fixed)
        for split, n in (("dev", n_dev), ("val", 2), ("test", n_t)):
            rows = []
            for i in range(n):
                words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8) + long_words))
                q = f"{split} {i} of {s}: which {words}?"
                if i == 1:
                    # quotes, a comma, a newline, leading/trailing spaces
                    q = f'  Consider "{words}", with a comma, and a second line.\nWhat follows? '
                    q = q.replace("Consider", f"Consider {split} {i} of {s}")
                choices = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3))) for _ in range(4)]
                if i == 2:
                    choices[3] = "None of the above, obviously"
                if split == "test" and fixed is not None:
                    ans = LETTERS.index(fixed[i])
                else:
                    ans = rng.randrange(4)
                rows.append((q, choices, ans))
            splits[split] = rows
        fixture[s] = splits
    return fixture


def write_csv(root, fixture) -> Path:
    root = Path(root)
    for s, splits in fixture.items():
        for split, rows in splits.items():
            d = root / split
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{s}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                for q, choices, ans in rows:
                    w.writerow([q, *choices, LETTERS[ans]])
    return root


def _records(s, rows):
    return {
        "question": [r[0] for r in rows],
        "subject": [s] * len(rows),
        "choices": [list(r[1]) for r in rows],
        "answer": [int(r[2]) for r in rows],
    }


_HF_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}


def write_parquet(root, fixture, layout: str = "subject") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    groups = {s: {s: v} for s, v in fixture.items()} if layout == "subject" else {"all": fixture}
    for folder, part in groups.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for split, hf_split in _HF_SPLITS.items():
            recs = {"question": [], "subject": [], "choices": [], "answer": []}
            for s, splits in part.items():
                for k, v in _records(s, splits[split]).items():
                    recs[k].extend(v)
            table = pa.table(
                {
                    "question": pa.array(recs["question"], pa.string()),
                    "subject": pa.array(recs["subject"], pa.string()),
                    "choices": pa.array(recs["choices"], pa.list_(pa.string())),
                    "answer": pa.array(recs["answer"], pa.int64()),
                }
            )
            pq.write_table(table, d / f"{hf_split}-00000-of-00001.parquet")
    return root


def write_saved(root, fixture, layout: str = "subject") -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    features = Features(
        {
            "question": Value("string"),
            "subject": Value("string"),
            "choices": Sequence(Value("string")),
            "answer": ClassLabel(names=list(LETTERS)),
        }
    )
    root = Path(root)
    groups = {s: {s: v} for s, v in fixture.items()} if layout == "subject" else {"all": fixture}
    for folder, part in groups.items():
        dd = {}
        for split, hf_split in _HF_SPLITS.items():
            recs = {"question": [], "subject": [], "choices": [], "answer": []}
            for s, splits in part.items():
                for k, v in _records(s, splits[split]).items():
                    recs[k].extend(v)
            dd[hf_split] = Dataset.from_dict(recs, features=features)
        DatasetDict(dd).save_to_disk(str(root / folder))
    return root
