"""How a config section becomes a typed, checked dataclass (lingua-style: one schema per concern, next to the
code that reads it; e.g. :class:`nora.train.config.TrainerConfig`).

:func:`load` merges a composed section into its dataclass with OmegaConf (unknown keys and wrong types are
rejected, missing keys take the dataclass default) and builds the instance, whose ``__post_init__`` checks
ranges and choices with :func:`require` / :func:`one_of`. Every failure is one line naming the full key:
``trainer.lr=-1.0: must be > 0``, ``trainer.scheduler='cosin'; valid: cosine, linear, constant``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from contextlib import contextmanager
from typing import Any, Iterable, Mapping, TypeVar

from nora.errors import UserError

T = TypeVar("T")


class ConfigValueError(UserError, ValueError):
    """A config value outside its type or range; ``key`` is relative to the section until :func:`load` adds it.
    Raised by a library config used on its own (``NoraConfig(init="magic")``), a choice reads ``unknown init
    'magic'; valid: ...``; inside a config section, ``method.nora.init='magic'; valid: ...``."""

    def __init__(self, key: str, message: str, standalone: str | None = None):
        super().__init__(standalone or f"{key}{message}")
        self.key, self.message = key, message

    def under(self, section: str) -> "ConfigValueError":
        return ConfigValueError(f"{section}.{self.key}" if section else self.key, self.message)


@contextmanager
def nested(section: str):
    """Checks of a schema nested in another (``method.nora``): their errors name ``section.<key>``."""
    try:
        yield
    except ConfigValueError as e:
        raise e.under(section) from None


def is_int(v: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a count to a config)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Fail with ``key=value: rule`` unless ``ok``."""
    if not ok:
        raise ConfigValueError(key, f"={value!r}: {rule}")


def one_of(key: str, value: Any, valid: Iterable[Any]) -> None:
    """Fail with ``key=value; valid: a, b, c`` unless ``value`` is one of ``valid``."""
    valid = tuple(valid)
    if value not in valid:
        listed = ", ".join(map(str, valid))
        raise ConfigValueError(
            key, f"={value!r}; valid: {listed}", standalone=f"unknown {key} {value!r}; valid: {listed}"
        )


def positive(key: str, value, allow_none: bool = False) -> None:
    require((allow_none and value is None) or (value is not None and value > 0), key, value, "must be > 0")


def at_least(key: str, value, low, allow_none: bool = False) -> None:
    require((allow_none and value is None) or (value is not None and value >= low), key, value, f"must be >= {low}")


def defaults(schema: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A dataclass schema's field defaults as a config node (tuples as lists; ``exclude``: fields left out): what a
    config group registers in Hydra's ConfigStore instead of restating the values in YAML."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.name in exclude:
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = "???" if value is dataclasses.MISSING else value  # OmegaConf's mandatory value
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _plain(node) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def escape_interpolations(value):
    """``value`` (resolved config values: dicts, lists, scalars) with every string escaped for OmegaConf, so that it
    reads back as written: a literal ``${oc.env:V}`` (typed ``\\${oc.env:V}`` on the command line) becomes
    ``\\${oc.env:V}``, and backslashes right before it are doubled. Without it, OmegaConf would take the literal for
    an interpolation again and fill it from whatever the environment holds then."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, Mapping):
        return {k: escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_interpolations(v) for v in value]
    return value


def load(schema: type[T], node, section: str) -> T:
    """``node`` (a DictConfig, resolved here; a dict of resolved values; or already a ``schema``) as a checked
    ``schema`` instance; errors name ``section.<key>``. A value holding interpolation syntax is taken as written."""
    if isinstance(node, schema):
        return node
    # omegaconf only here: the checks above serve the library's own configs on a core install (no omegaconf)
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    plain = _plain(node) or {}
    _check_finite(plain, section)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), escape_interpolations(plain))
        return OmegaConf.to_object(merged)
    except ConfigValueError as e:
        raise e.under(section) from None
    except ConfigKeyError as e:  # the keys of the (nested) schema the unknown key is in: method.nora.foo lists nora's
        valid = ", ".join(f.name for f in dataclasses.fields(_schema_at(schema, str(e.full_key or e.key or ""))))
        raise UserError(f"{_key(section, e)}: no such key; valid: {valid}") from None
    except ValidationError as e:
        # OmegaConf says "Value 'abc' of type 'str' could not be converted to Float": the key already shows the value
        why = re.sub(r"^Value '.*' of type '\w+' ", "", _first_line(e.msg))
        raise UserError(f"{_key(section, e)}={e.value!r}: {why}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{section}: {_first_line(e.msg)}") from None


def _schema_at(schema: type, key: str) -> type:
    """The dataclass that holds the last part of the dotted ``key`` (``nora.foo`` in MethodConfig: NoraSettings)."""
    import typing

    for part in key.split(".")[:-1]:
        hint = typing.get_type_hints(schema).get(part)
        inner = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if not inner:
            break
        schema = inner[0]
    return schema


def _check_finite(node, key: str) -> None:
    """No config value is inf or nan (``method.nora.alpha=inf`` would train NaNs, ``trainer.lr=nan`` nothing):
    one line naming the key."""
    if isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{key}={node!r}: must be a finite number")
    items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for k, v in items:
        _check_finite(v, f"{key}.{k}" if key else str(k))


def _key(section: str, e) -> str:
    key = str(e.full_key or e.key or "")
    return ".".join(k for k in (section, key) if k)


def _first_line(msg: str) -> str:
    return str(msg).strip().splitlines()[0] if msg else "invalid value"


def per_family(value, family: str, what: str):
    """A setting given either as one value or as ``{vision: .., causal_lm: ..}``."""
    if isinstance(value, Mapping):
        if family not in value:
            raise UserError(f"{what} has no value for {family} models (has: {', '.join(value)})")
        return value[family]
    return value
