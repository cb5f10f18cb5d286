"""Evaluation: MMLU (k-shot, log-likelihood of the answer letters, lm-evaluation-harness protocol)."""

from nora.eval.mmlu import (
    MMLUResult,
    SubjectResult,
    build_prompt,
    continuation_tokens,
    encode_pair,
    evaluate_mmlu,
    model_max_length,
    run_mmlu,
    write_mmlu_json,
)
from nora.eval.mmlu_data import (
    CATEGORIES,
    GROUPINGS,
    MMLUQuestion,
    SubjectData,
    all_subjects,
    detect_source,
    load_mmlu,
    resolve_subjects,
    subject_categories,
    subject_table,
)

__all__ = [
    "CATEGORIES",
    "GROUPINGS",
    "MMLUQuestion",
    "MMLUResult",
    "SubjectData",
    "SubjectResult",
    "all_subjects",
    "build_prompt",
    "continuation_tokens",
    "detect_source",
    "encode_pair",
    "evaluate_mmlu",
    "load_mmlu",
    "model_max_length",
    "resolve_subjects",
    "run_mmlu",
    "subject_categories",
    "subject_table",
    "write_mmlu_json",
]
