"""Instruction data written in the real on-disk formats, for offline tests.

* Alpaca: ``alpaca_data.json`` of the Stanford Alpaca repo is one JSON list of ``{"instruction", "input",
  "output"}`` objects (``json.dump(..., indent=4)``); JSONL holds one object per line; the hub copy
  ``tatsu-lab/alpaca`` is parquet with an extra ``text`` column.
* OpenOrca: ``Open-Orca/OpenOrca`` ships parquet files (``1M-GPT4-Augmented.parquet``,
  ``3_5M-GPT3_5-Augmented.parquet``) with string columns ``id``, ``system_prompt``, ``question``, ``response``.
"""

from __future__ import annotations

import json
from pathlib import Path

ALPACA_RECORDS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.",
    },
    {"instruction": "Translate the sentence into French.", "input": "The cat is black.", "output": "Le chat est noir."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
    {
        "instruction": "Summarize the following paragraph in one sentence.",
        "input": "The quick brown fox jumps over the lazy dog. The dog does not move. The fox runs away.",
        "output": "A fox jumps over a lazy dog and runs away.",
    },
    {
        "instruction": "Find the degree of the field extension Q(sqrt(2), sqrt(3)) over Q.",
        "input": "",
        "output": "The answer is 4 because the minimal polynomial has degree four.",
    },
    {"instruction": "Classify the word as a noun or a verb.", "input": "run", "output": "Verb."},
    {
        "instruction": "Write a haiku about energy.",
        "input": "",
        "output": "Force, mass, velocity,\nacceleration of cells:\nenergy at rest.",
    },
    {
        "instruction": "Which of the following is true?",
        "input": "A. 2 + 2 = 4\nB. 2 + 2 = 5",
        "output": "A. 2 + 2 = 4 is true; B is false.",
    },
]

OPENORCA_SYSTEM_PROMPTS = [
    "",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as "
    "you can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provides explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
]


def alpaca_records(n: int | None = None) -> list[dict]:
    """``n`` Alpaca records (the fixed ones first, then numbered variants)."""
    if n is None or n <= len(ALPACA_RECORDS):
        return [dict(r) for r in ALPACA_RECORDS[:n]]
    out = [dict(r) for r in ALPACA_RECORDS]
    for i in range(len(out), n):
        base = ALPACA_RECORDS[i % len(ALPACA_RECORDS)]
        out.append(
            {
                "instruction": f"{base['instruction']} (variant {i})",
                "input": base["input"],
                "output": f"{base['output']} Answer {i}.",
            }
        )
    return out


def openorca_records(n: int = 12) -> list[dict]:
    """``n`` OpenOrca-format records with ids in the dataset's style (``niv.*``, ``flan.*``, ``t0.*``, ``cot.*``)."""
    families = ["niv", "flan", "t0", "cot"]
    out = []
    for i in range(n):
        q = ALPACA_RECORDS[i % len(ALPACA_RECORDS)]
        question = q["instruction"] + (f"\n\n{q['input']}" if q["input"] else "")
        out.append(
            {
                "id": f"{families[i % 4]}.{100000 + 7919 * i}",
                "system_prompt": OPENORCA_SYSTEM_PROMPTS[i % len(OPENORCA_SYSTEM_PROMPTS)],
                "question": f"{question} (question {i})",
                "response": f"{q['output']} (response {i})",
            }
        )
    return out


def write_alpaca_json(path: str | Path, records: list[dict] | None = None) -> Path:
    """A JSON list of records, formatted like ``alpaca_data.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records if records is not None else alpaca_records(), indent=4, ensure_ascii=False))
    return path


def write_alpaca_jsonl(path: str | Path, records: list[dict] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records if records is not None else alpaca_records():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_alpaca_parquet(path: str | Path, records: list[dict] | None = None) -> Path:
    """Parquet as in ``tatsu-lab/alpaca`` on the hub (with its extra ``text`` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nora.data.instruct import format_alpaca_prompt

    records = records if records is not None else alpaca_records()
    cols = {k: [r[k] for r in records] for k in ("instruction", "input", "output")}
    cols["text"] = [format_alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()}), str(path))
    return path


def write_openorca_parquet(path: str | Path, records: list[dict] | None = None, row_group_size: int = 1000) -> Path:
    """Parquet with the OpenOrca schema: string columns id, system_prompt, question, response."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = records if records is not None else openorca_records()
    schema = pa.schema([(c, pa.string()) for c in ("id", "system_prompt", "question", "response")])
    table = pa.table({c: pa.array([r.get(c) for r in records], pa.string()) for c in schema.names}, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return path


def tiny_nora_pp_run(root: Path, max_steps: int = 3) -> Path:
    """A complete NoRA++ training run of the tiny LLaMA on 12 Alpaca records under ``root`` (the run is
    ``root / "run"``): what eval.py, publishing and reload tests read."""
    from nora.app.config import compose
    from nora.app.training import run_training

    data = write_alpaca_json(root / "alpaca_data.json", alpaca_records(12))
    cfg = compose(
        [
            "method=nora_pp",
            "model=llama_tiny",
            "dataset=alpaca",
            f"data.path={data}",
            f"output_root={root}",
            "logger=disabled",
            "trainer.device=cpu",
            "trainer.batch_size=4",
            "trainer.num_workers=0",
            f"trainer.max_steps={max_steps}",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.progress=false",
            "dataset.val_size=4",
            "dataset.max_length=128",
            f"dataset.cache_dir={root / 'cache'}",
            "method.nora.calibration_batches=1",
        ]
    )
    run_training(cfg, run_dir=root / "run")
    return root / "run"


def build_instruct(tmp_path: Path, tok, **kw):
    """nora's instruction datasets of ``InstructDataConfig(**kw)`` (no validation split, a cache under ``tmp_path``)."""
    from nora.data.instruct import InstructDataConfig, build_instruct_datasets

    kw.setdefault("val_size", 0)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_instruct_datasets(InstructDataConfig(**kw), tok)
