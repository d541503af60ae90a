"""The base of every model config: a frozen dataclass that round-trips through JSON.

A checkpoint is safetensors weights plus the JSON of its config (DESIGN.md), so the config
alone must rebuild the exact architecture: ``model_from_config(json.load(f))``. The JSON
carries a ``"kind"`` field naming the model class. Unknown keys and ill-typed values are
refused with a ``ValueError`` that names them, instead of the pages of size-mismatch errors
that flag-only architectures give (guided-diffusion #8, #96).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

__all__ = ["ModelConfig"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_keys(cls, d: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the keys of ``d`` that are not fields of the dataclass ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) for {cls.__name__}: {unknown}; valid keys: {names}")


class ModelConfig:
    """Mixin for frozen model-config dataclasses: type checks, ``to_dict``/``from_dict``, JSON.

    Subclasses set the class attribute ``kind`` and implement ``validate()`` (raise
    ``ValueError`` with the field name). Field annotations drive the generic checks: ``int``,
    ``float``, ``bool``, ``int | None`` and ``tuple[int, ...]`` (a JSON list becomes a tuple).
    """

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in dataclasses.fields(self):
            v, ann = getattr(self, f.name), str(f.type).replace(" ", "")
            bad = False
            if ann.startswith("tuple"):
                if isinstance(v, list):  # JSON has no tuples
                    v = tuple(v)
                    object.__setattr__(self, f.name, v)
                bad = not (isinstance(v, tuple) and all(_is_int(e) for e in v))
            elif ann == "bool":
                bad = not isinstance(v, bool)
            elif ann == "int":
                bad = not _is_int(v)
            elif ann in ("int|None", "Optional[int]"):
                bad = v is not None and not _is_int(v)
            elif ann == "float":
                if _is_int(v):
                    object.__setattr__(self, f.name, float(v))
                else:
                    bad = not isinstance(v, float)
            if bad:
                raise ValueError(f"{name}.{f.name} must be {ann}, got {v!r}")
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def _fail(self, field: str, message: str) -> None:
        raise ValueError(f"invalid {type(self).__name__}.{field}: {message} (got {getattr(self, field)!r})")

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``"kind"`` first; ``model_from_config`` rebuilds the model from it."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dict (e.g. parsed JSON); missing keys take their defaults.

        Raises ``ValueError`` naming any unknown key, or a ``"kind"`` that is not this class's.
        """
        d = dict(d)
        kind = d.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__} has kind {cls.kind!r}, but the dict says kind={kind!r}")
        check_keys(cls, d)
        return cls(**d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        """A copy with some fields changed (validated again); unknown names raise ``ValueError``."""
        return type(self).from_dict({**self.to_dict(), **changes})
