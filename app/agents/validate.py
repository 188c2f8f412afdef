"""Checking tool arguments against their JSON schema, for the subset of JSON schema tools use.

Covers type (one or a list), enum, const, anyOf/oneOf, properties, required,
additionalProperties: false, items, min/maxItems, min/maxLength, minimum/maximum.
Unknown keywords are ignored, so a richer schema is checked only as far as this goes.
The messages are written for the model, which gets them back as the tool's result.
"""
import json
from typing import Any

_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict[str, Any], path: str = "arguments") -> list[str]:
    """The ways `value` breaks `schema`, as readable messages; empty if it is valid."""
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        if not any(not validate(value, option, path) for option in alternatives):
            return [f"{path}: {_show(value)} matches none of the allowed forms"]
    if "const" in schema and not _same(value, schema["const"]):
        return [f"{path}: must be {_show(schema['const'])}, got {_show(value)}"]
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        return [f"{path}: must be one of {', '.join(map(_show, schema['enum']))}; got {_show(value)}"]
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPE_CHECKS.get(kind, lambda v: True)(value) for kind in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {_show(value)}"]
    if isinstance(value, dict):
        return _object_errors(value, schema, path)
    if isinstance(value, list):
        return _array_errors(value, schema, path)
    return _scalar_errors(value, schema, path)


def _object_errors(value: dict, schema: dict, path: str) -> list[str]:
    errors = [f"{path}: missing required argument {key!r}" for key in schema.get("required", []) if key not in value]
    properties = schema.get("properties", {})
    for key, item in value.items():
        if key in properties:
            errors += validate(item, properties[key], f"{path}.{key}")
        elif schema.get("additionalProperties") is False:
            allowed = ", ".join(properties) or "none"
            errors.append(f"{path}: unexpected argument {key!r} (allowed: {allowed})")
        elif isinstance(schema.get("additionalProperties"), dict):
            errors += validate(item, schema["additionalProperties"], f"{path}.{key}")
    return errors


def _array_errors(value: list, schema: dict, path: str) -> list[str]:
    errors = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{path}: needs at least {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: allows at most {schema['maxItems']} items")
    if isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _scalar_errors(value: Any, schema: dict, path: str) -> list[str]:
    errors = []
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: needs at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: allows at most {schema['maxLength']} characters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: must be >= {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: must be <= {schema['maximum']}, got {value}")
    return errors


def _same(a: Any, b: Any) -> bool:
    # In Python True == 1; in JSON they are different values.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)
