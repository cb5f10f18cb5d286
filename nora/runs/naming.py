"""A run's name carries every command-line override that changes its result and is not already spelled in it.

``configs/train.yaml`` names a run ``${model.name}_${dataset.name}_${method.name}_s${seed}${run_overrides:}``.
The ``run_overrides`` resolver (registered when this module is imported, as :mod:`nora.app.config` does) appends
the job's value overrides in Hydra's ``override_dirname`` style, sorted by key:
``python train.py -m trainer.lr=1e-3,5e-4 method.nora.r=2,3`` writes
``runs/vit_tiny_cifar100_nora_s0_method.nora.r=2,trainer.lr=0.001`` and three siblings, so any sweep gets one
directory per distinct configuration and re-running it finds them again. Left out, because the name already
says them or they do not change the result:

* config-group choices (``method=lora``, ``experiment=llama3_alpaca``, ``budget=lora_r9``): a group's
  settings are named by the keys the name spells (``method.name`` ...) or by the sweep's own ``run_name``;
* keys the ``run_name`` template itself references (``seed``; ``method.nora.r`` in the ablation sweeps);
* keys that decide where outputs go, logging, resuming or progress (:data:`nora.runs.identity.NOT_RESULT_KEYS`,
  :data:`nora.runs.identity.NOT_RESULT_TRAINER_KEYS`), and where inputs are read from (:data:`INPUT_LOCATION_KEYS`);
* ``hydra.*`` overrides (launcher, callbacks).

Values are the composed config's (``1e-3`` and ``0.001`` name the same run), whichever way the job was started:
``train.py`` (single run or ``-m``), the sweep plan (``nora.results.sweep``) or ``hydra.compose(...,
return_hydra_config=True)``. A config composed without its ``hydra`` node records no overrides and gets the
plain name: pass ``run_name=`` or ``run_dir`` there. A suffix longer than :data:`MAX_SUFFIX` characters is replaced
by a hash of itself (``_cfg-<12 hex>``), so a name always fits a file system's 255-byte limit.
"""

from __future__ import annotations

import hashlib
import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from nora.runs.identity import NOT_RESULT_KEYS, NOT_RESULT_TRAINER_KEYS

RESOLVER = "run_overrides"
# Where a run reads its inputs from: a copy of the same data or weights elsewhere is the same run (and a path in a
# directory name would nest directories).
INPUT_LOCATION_KEYS = (
    "data.path",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.download",
    "dataset.verify_md5",
    "model.path",
    "model.tokenizer",
)
MAX_SUFFIX = 160
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _task_overrides_and_groups(root: DictConfig) -> tuple[list[str], set[str]]:
    """The job's command-line (task) overrides and the config groups it chose: from the config's own ``hydra``
    node (the sweep plan, ``compose(return_hydra_config=True)``, Hydra resolving the output directory) or from
    the running Hydra job (``train.py``'s task function gets its config without that node)."""
    hydra = root.get("hydra") if "hydra" in root else None
    if hydra is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return [], set()
        hydra = HydraConfig.get()
    task = list(OmegaConf.select(hydra, "overrides.task", default=None) or [])
    groups = set(OmegaConf.select(hydra, "runtime.choices", default=None) or {})
    return task, groups


def _named_keys(root: DictConfig) -> set[str]:
    """The keys the ``run_name`` template references (``${seed}``, ``${method.nora.r}``)."""
    template = root._get_node("run_name")._value() if "run_name" in root else ""
    return set(_REFERENCE.findall(str(template)))


def _left_out(key: str, named: set[str], groups: set[str]) -> bool:
    top, _, rest = key.partition(".")
    return (
        key in groups
        or "@" in key
        or "/" in key
        or top == "hydra"
        or key in named
        or top in NOT_RESULT_KEYS
        or key in INPUT_LOCATION_KEYS
        or (top == "trainer" and rest in NOT_RESULT_TRAINER_KEYS)
    )


def _format(value) -> str:
    if isinstance(value, (ListConfig, list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, (DictConfig, dict)):
        return "{" + ",".join(f"{k}:{_format(v)}" for k, v in value.items()) + "}"
    return str(value).replace("/", "_").replace(" ", "")


def override_suffix(root: DictConfig) -> str:
    """``_key=value,key=value`` for the job's result-changing value overrides that the name does not spell;
    empty when there are none (see the module docstring)."""
    task, groups = _task_overrides_and_groups(root)
    named = _named_keys(root)
    pairs = {}
    for line in task:
        key = line.split("=", 1)[0].lstrip("+~")
        if _left_out(key, named, groups):
            continue
        pairs[key] = f"~{key}" if line.startswith("~") else f"{key}={_format(OmegaConf.select(root, key))}"
    if not pairs:
        return ""
    suffix = ",".join(pairs[k] for k in sorted(pairs))
    if len(suffix) > MAX_SUFFIX:
        suffix = "cfg-" + hashlib.sha256(suffix.encode()).hexdigest()[:12]
    return "_" + suffix


def register_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda *, _root_: override_suffix(_root_))


register_resolver()
