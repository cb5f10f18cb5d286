"""The method and model-family registries: every configs/method/*.yaml is a registered method and vice versa, each
family has its dataset schema and setup, and a method added in one new file (plus its YAML) trains, is counted in
the parameter report under its own name and appears in a rendered results table."""

import importlib
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nora.app.config import CONFIG_DIR, compose, validate
from nora.app.setup import SETUPS
from nora.app.training import run_training
from nora.data.config import DATASET_SCHEMAS
from nora.errors import UserError
from nora.methods import METHODS, get_method
from nora.models.config import FAMILIES
from nora.results.collect import collect
from nora.results.demo_report import demo_report

ROOT = Path(__file__).resolve().parent.parent
METHOD_YAMLS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


def test_every_method_yaml_is_a_registered_method_and_vice_versa():
    assert METHOD_YAMLS == sorted(METHODS)
    for name in METHOD_YAMLS:
        cfg = OmegaConf.to_container(compose([f"method={name}"]).method, resolve=True)
        assert cfg["name"] == name
        assert tuple(cfg["families"]) == METHODS[name].families, name
        for block in ("lora", "nora", "baseline"):
            assert (cfg.get(block) is not None) == (block in METHODS[name].settings), (name, block)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="^unknown method 'nope'; valid: full, linear_probe, lora, dora, nora, "):
        get_method("nope")


def test_every_family_has_its_dataset_schema_and_setup():
    assert set(FAMILIES) == set(DATASET_SCHEMAS) == set(SETUPS) == {"vision", "causal_lm"}


def test_no_family_comparisons_outside_the_registries():
    """What a family or a method is lives in its registry entry: no code compares family names, and the methods that
    use LoRA are a property of the method registry (``uses_lora``), not a tuple of names."""
    pattern = r'family [!=]=|[!=]= "(vision|causal_lm)"|LORA_LIKE'
    found = subprocess.run(
        ["grep", "-rnE", pattern, "nora", "train.py", "eval.py"], cwd=ROOT, capture_output=True, text=True
    ).stdout.splitlines()
    assert [line.split(":")[0] for line in found] == ["nora/app/config.py"]  # the dataset's family vs the model's
    assert "d.family != m.family" in found[0]


# the tables', reports', demos' and benches' definitions by method name: which methods, which reference, which pairs
METHOD_CONSTANTS = {
    "nora.results.tables": (
        "TABLE1_METHODS",
        "TABLE1_REFERENCE",
        "LOW_BUDGET_METHODS",
        "LOW_BUDGET_REFERENCE",
        "TABLE2_METHODS",
        "TABLE2_REFERENCE",
        "ABLATION_VARIANTS",
        "ABLATION_REFERENCE",
        "ARMS",
    ),
    "nora.results.render": ("SUBSPACE_METHODS", "SUBSPACE_REFERENCE", "SUBSPACE_CONTRASTS"),
    "nora.results.budget": ("BUDGET_REFERENCE", "UNRANKED_ARMS", "RANKED_METHODS"),
    "nora.results.demo_report": ("DEMO_PAIRS", "DEMO_REFERENCE"),
    "nora.results.demo_llm_report": ("PAIRS",),
    "nora.demo.runner": ("HEAD_LR_METHOD",),
    "nora.demo.diagnosis": ("HEAD_LR_METHODS", "STABILITY_METHODS", "FORM_METHODS", "MEASURED_METHODS"),
    "nora.demo.llm_diagnosis": ("NORA", "NORA_PP", "DIAGNOSED_METHODS"),
    "nora.bench.train_step": ("DEFAULT_METHODS", "DEFAULT_COMPILE_METHODS", "REFERENCE_METHODS"),
    "nora.bench.mlp_block": ("LORA_VARIANTS", "NORA_VARIANTS"),
}
METHOD_NAMES = "full|linear_probe|lora|dora|nora|nora_pp|rational_ft|zero_init_ft|bitfit|ln_tuning|ia3|vera"
METHOD_COMPARISON = re.compile(rf'(==|!=|\bin) *\(?"({METHOD_NAMES})"')
METHOD_TUPLE = re.compile(rf'\("({METHOD_NAMES})", *"')
CONSTANT_DECLARATION = re.compile(r"^[A-Z][A-Z0-9_]*(, *[A-Z][A-Z0-9_]*)* *(: *[^=]+)?= ")
# other vocabularies sharing words with method names: NoraConfig.variant, adapter kinds, components, loggers
OTHER_VOCABULARIES = {
    "nora/adapter/layer.py",
    "nora/adapter/config.py",
    "nora/tuner/layer.py",
    "nora/logs.py",
    "nora/app/adapters.py",
    "nora/adapter/accounting.py",
}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _strings(v)


def test_every_method_a_table_report_or_demo_names_is_registered():
    for module, names in METHOD_CONSTANTS.items():
        mod = importlib.import_module(module)
        for name in names:
            used = list(_strings(getattr(mod, name)))
            assert used, (module, name)
            for method in used:
                assert get_method(method).name == method, (module, name)
    for m in METHODS.values():
        assert m.lr_from is None or get_method(m.lr_from).uses_lora, m.name
    assert [m.name for m in METHODS.values() if not m.head_lr] == ["full", "linear_probe"]


def test_no_method_comparisons_outside_the_registries():
    """What a method does is a property of its registry entry; which methods a table or report shows is a named
    constant at module level (``TABLE1_METHODS``, ``TABLE1_REFERENCE``): no code compares to a method name inline."""
    files = [p for p in sorted((ROOT / "nora").rglob("*.py")) if not p.relative_to(ROOT).parts[1] == "methods"]
    files = [p for p in files if p.relative_to(ROOT).as_posix() not in OTHER_VOCABULARIES]
    found = []
    for path in [*files, ROOT / "train.py", ROOT / "eval.py"]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if CONSTANT_DECLARATION.match(line):
                continue
            if METHOD_COMPARISON.search(line) or METHOD_TUPLE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []


TOY_METHOD = '''
from torch import nn

from nora.methods.registry import Method, register_method


def train_norms(model, ctx):
    """Every LayerNorm of the backbone trains (and the new head)."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    if ctx.head:
        model.get_submodule(ctx.head).requires_grad_(True)
    return model, None


register_method(Method("toy_norms", "Toy norms", train_norms, families=("vision",), components=(("norms", "norm"),)))
'''

TOY_YAML = """
name: toy_norms
families: [vision]
full: false
train_head: true
lora: null
nora: null
lr: {vision: 1.0e-3}
head_lr: null
nora_lr: null
weight_decay: 0.0
"""


@pytest.fixture
def toy_method(tmp_path):
    """The toy method's module (imported from a tmp dir: it registers itself) and its YAML on Hydra's search path."""
    (tmp_path / "toy_norms.py").write_text(TOY_METHOD)
    (tmp_path / "configs" / "method").mkdir(parents=True)
    (tmp_path / "configs" / "method" / "toy_norms.yaml").write_text(TOY_YAML)
    spec = importlib.util.spec_from_file_location("toy_norms", tmp_path / "toy_norms.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        yield f"hydra.searchpath=[file://{tmp_path / 'configs'}]"
    finally:
        METHODS.pop("toy_norms")


def test_a_method_added_in_one_file_trains_is_counted_and_tabled(toy_method, tmp_path):
    root = tmp_path / "runs"
    overrides = [
        toy_method,
        "method=toy_norms",
        "model=vit_test",
        "dataset=digits",
        "dataset.name=digits_target",
        "dataset.limit_train=64",
        "dataset.limit_eval=64",
        f"output_root={root}",
        "logger=disabled",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=64",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
    ]
    cfg = compose(overrides)
    assert validate(cfg).method.name == "toy_norms"
    summary = run_training(cfg, run_dir=root / "toy_s0")
    components = summary["parameters"]["components"]
    # vit_test: 2 blocks x 2 LayerNorms + the final one, 2 x 32 parameters each; the head: 32 x 10 + 10
    assert components["norms"] == 5 * 64 and components["head"] == 330 and components["base"] == 0
    assert summary["steps"] == 2

    tasks = {"all": {"description": "all digits", "classes": list(range(10)), "transform": "none"}}
    md = demo_report(collect(root), reference="toy_norms", tasks=tasks).markdown()
    assert re.search(r"^\| Toy norms \| 650 \|", md, re.M), md

    with pytest.raises(UserError, match="^method=toy_norms does not apply to causal_lm models; valid: full, "):
        validate(compose([toy_method, "method=toy_norms", "model=llama_tiny", "dataset=alpaca"]))
