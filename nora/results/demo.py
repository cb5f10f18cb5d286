"""The offline demo's table (results/demo.md, results/demo.csv) from the demo's run directories.

Kept as the entry point ``nora.demo`` calls; the table itself is :func:`nora.results.tables.demo_report`.
"""
from nora.results.tables import demo_report, render_demo_table

__all__ = ["render_demo_table", "demo_report"]
