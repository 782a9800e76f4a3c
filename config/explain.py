"""Every setting with its effective value and its description, for `mqi config check`."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pydantic import BaseModel


def described(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, effective value as JSON, description) of every leaf setting, in declaration order."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from described(value, f"{key}.")
        else:
            shown = json.dumps(value.model_dump() if isinstance(value, BaseModel) else value, default=str)
            yield key, shown, field.description or ""


def missing_descriptions(model_type: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of settings without a description (every model the settings can hold)."""
    missing = []
    for name, field in model_type.model_fields.items():
        key = f"{prefix}{name}"
        if not field.description:
            missing.append(key)
        for inner in _models_in(field.annotation):
            missing += missing_descriptions(inner, f"{key}.")
    return missing


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in _models_in(arg)]
