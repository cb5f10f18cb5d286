"""Adapters of nora to other tools' plugin interfaces (lm-evaluation-harness)."""
