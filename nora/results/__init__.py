"""Tables, figures and analyses generated from run directories (never by re-training).

    python -m nora.results tables            # everything in results/ from whatever runs exist (make tables)
    python -m nora.results demo-table        # the offline digits demo's table only (make demo-table)
    python -m nora.results plan table1       # a sweep's jobs and their state, without launching
    python -m nora.results mmlu-jobs         # Table 2 evaluations still to run (eval.py arguments)
    python -m nora.results budget            # matched-budget parameter counts (sweeps/README.md)

Modules: ``collect`` (read run directories), ``stats`` (mean ± std, paired differences with a 95% CI),
``tables`` (Markdown/CSV tables), ``subspace`` (the coefficient-update analysis), ``figures`` (PNG plots),
``sweep`` (sweep expansion and the plan callback), ``budget`` (matched-budget counts), ``paper`` (numbers quoted
from the paper's abstract).
"""
