"""The method and model-family registries: every configs/method/*.yaml is a registered method and vice versa, each
family has its dataset schema and setup, and a method added in one new file (plus its YAML) trains, is counted in
the parameter report under its own name and appears in a rendered results table."""

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
