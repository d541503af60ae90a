"""The base of every config of the package: a frozen dataclass that round-trips through JSON.

A checkpoint is safetensors weights plus the JSON of its configs (DESIGN.md), so the configs
alone must rebuild the exact architecture and run: ``model_from_config(json.load(f))``.
:class:`JSONConfig` is the one base of them all (the model configs here, ``DiffusionConfig``
and ``TrainConfig`` in ``ddpm_lib.configs``, ``DataConfig`` in ``ddpm_lib.presets``);
:class:`ModelConfig` adds the ``"kind"`` field naming the model class. Unknown keys and
ill-typed values are refused with a ``ValueError`` that names them, instead of the pages of
size-mismatch errors that flag-only architectures give (guided-diffusion #8, #96).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

__all__ = ["JSONConfig", "ModelConfig", "check_keys"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _annotation(field: dataclasses.Field) -> str:
    """A field's annotation as written (``"int | None"``); a real type (a module without
    ``from __future__ import annotations``) by its name."""
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))


def _checked(annotation: str, v: Any) -> tuple[bool, Any]:
    """(whether ``v`` fits ``annotation``, the value to store). Checked: ``int``, ``float`` (an int
    is stored as a float: JSON writes 1e-3 but may give 1), ``bool``, ``str``, ``tuple[int, ...]``
    (a JSON list becomes a tuple: JSON has no tuples) and each of them ``| None``; any other
    annotation is left to the subclass's ``validate``."""
    ann = annotation.replace(" ", "")
    if ann.startswith("Optional[") and ann.endswith("]"):
        ann = ann[len("Optional["):-1] + "|None"
    if ann.endswith("|None"):
        if v is None:
            return True, v
        ann = ann[: -len("|None")]
    if ann.startswith("tuple"):
        v = tuple(v) if isinstance(v, list) else v
        return isinstance(v, tuple) and all(_is_int(e) for e in v), v
    if ann == "float":
        v = float(v) if _is_int(v) else v
        return isinstance(v, float), v
    kinds = {"int": _is_int, "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str)}
    return kinds.get(ann, lambda x: True)(v), v


def check_keys(cls, d: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the keys of ``d`` that are not fields of the dataclass ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) for {cls.__name__}: {unknown}; valid keys: {names}")


class JSONConfig:
    """Mixin for frozen config dataclasses: type checks from the field annotations, then
    ``validate()``; ``to_dict``/``from_dict``/JSON and ``replace``.

    Subclasses implement ``validate()`` with :meth:`_require` or :meth:`_fail`, whose
    ``ValueError`` names the class and the field: ``"TrainConfig.lr must be > 0, got 0.0"``.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            ok, value = _checked(_annotation(f), getattr(self, f.name))
            if not ok:
                self._fail(f.name, f"must be {_annotation(f)}")
            object.__setattr__(self, f.name, value)  # frozen: the int -> float and list -> tuple fixes
        self.validate()

    def validate(self) -> None:
        pass

    def _fail(self, field: str, message: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field} {message}, got {getattr(self, field)!r}")

    def _require(self, ok: bool, field: str, message: str) -> None:
        if not ok:
            self._fail(field, message)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Rebuild from ``to_dict()`` (e.g. parsed JSON); missing keys take their defaults, unknown
        keys and wrong types raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} needs a dict, got {type(d).__name__}")
        check_keys(cls, d)
        return cls(**d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        """A copy with some fields changed (validated again); unknown names raise ``ValueError``."""
        return type(self).from_dict({**self.to_dict(), **changes})


class ModelConfig(JSONConfig):
    """Base of the model configs: a :class:`JSONConfig` whose dict carries ``"kind"``, the key of
    ``ddpm_lib.models.MODEL_KINDS`` that names the model class. Subclasses set the class
    attribute ``kind`` and implement ``validate()``."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The fields with ``"kind"`` first; ``model_from_config`` rebuilds the model from it."""
        return {"kind": self.kind, **super().to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """As :meth:`JSONConfig.from_dict`; a ``"kind"`` that is not this class's raises ``ValueError``."""
        if isinstance(d, dict) and "kind" in d:
            d = dict(d)
            if (kind := d.pop("kind")) != cls.kind:
                raise ValueError(f"{cls.__name__} has kind {cls.kind!r}, but the dict says kind={kind!r}")
        return super().from_dict(d)
