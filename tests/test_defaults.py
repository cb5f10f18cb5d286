"""One home per default: NoRA's fields and defaults are declared in nora.NoraConfig alone; the peft config
(NoraPeftConfig) and the Hydra settings (NoraSettings, configs/adapter/nora.yaml) take them from there. Each test
fails if a copy drifts."""

import dataclasses

import pytest
from omegaconf import OmegaConf

import nora
from nora.app.config import NORA_NOT_IN_CONFIG, compose
from nora.methods.config import NoraSettings
from nora.schema import defaults

NORA_FIELDS = {f.name: f for f in dataclasses.fields(nora.NoraConfig)}


def _default(f):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return list(value) if isinstance(value, tuple) else value


def test_peft_config_has_noras_fields_defaults_and_help():
    peft_fields = {f.name: f for f in dataclasses.fields(nora.NoraPeftConfig)}
    # every NoRA field but trainable_modules (peft's modules_to_save) is a NoraPeftConfig field
    assert set(NORA_FIELDS) - set(peft_fields) == {"trainable_modules"}
    new = nora.NoraPeftConfig()
    for name, f in NORA_FIELDS.items():
        if name == "trainable_modules":
            continue
        assert getattr(new, name) == _default(f), name  # residual: None resolves to NoraConfig's default
        assert peft_fields[name].metadata["help"], name
    assert new.nora_config() == nora.NoraConfig()


def test_a_changed_default_reaches_the_peft_config(monkeypatch):
    """The peft config reads the declaration (not a copy of its values): NoraPeftConfig.nora_config passes every
    NoRA field through, so a value set on the peft config arrives in the NoraConfig it builds."""
    values = {"r": 5, "alpha": 2.5, "groups": 4, "degrees": [3, 2], "fit_range": [-4.0, 2.0], "residual": False}
    built = nora.NoraPeftConfig(**values).nora_config()
    assert {k: getattr(built, k) for k in values} == {**values, "degrees": (3, 2), "fit_range": (-4.0, 2.0)}


@pytest.mark.parametrize("method", ["nora", "nora_pp", "rational_ft", "zero_init_ft"])
def test_hydra_nora_block_is_the_schema_defaults(method):
    cfg = compose([f"method={method}", "model=vit_test", "dataset=cifar10"])
    block = OmegaConf.to_container(cfg.method.nora, resolve=False)
    interpolated = {k for k, v in block.items() if isinstance(v, str) and v.startswith("${")}
    assert interpolated == {"residual", "init", "target_modules"}
    expected = defaults(NoraSettings, exclude=NORA_NOT_IN_CONFIG)
    assert set(block) == set(expected)
    # what the method's own YAML sets (e.g. rational_ft's variant and numerator) on top of the schema's defaults
    from nora.app.config import CONFIG_DIR

    own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "method" / f"{method}.yaml")).get("nora") or {}
    literal = {k: v for k, v in block.items() if k not in interpolated}
    assert literal == {**{k: v for k, v in expected.items() if k not in interpolated}, **own}
    # the typed settings a run gets: NoraSettings' own defaults wherever neither YAML decides
    settings = NoraSettings(**OmegaConf.to_container(cfg.method.nora, resolve=True))
    assert (
        (settings.r, settings.degrees, settings.fit_range)
        == (3, (5, 4), (-3.0, 3.0))
        == (
            NoraSettings().r,
            NoraSettings().degrees,
            NoraSettings().fit_range,
        )
    )


def test_hydra_nora_yaml_restates_no_default():
    """configs/adapter/nora.yaml sets only interpolations (what other groups decide): no literal value to drift."""
    from nora.app.config import CONFIG_DIR

    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "adapter" / "nora.yaml"), resolve=False)
    assert raw.pop("defaults") == ["nora_defaults@_here_", "_self_"]
    assert all(isinstance(v, str) and v.startswith("${") for v in raw.values()), raw


def test_a_nora_override_still_composes_and_an_unknown_key_is_refused():
    cfg = compose(["method=nora", "model=vit_test", "dataset=cifar10", "method.nora.r=5", "method.nora.groups=4"])
    assert cfg.method.nora.r == 5 and cfg.method.nora.groups == 4
    with pytest.raises(Exception, match="rank"):
        compose(["method=nora", "model=vit_test", "dataset=cifar10", "method.nora.rank=5"])
