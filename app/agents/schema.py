"""Tools: a Python function plus the JSON schema that tells the model how to call it.

The schema is derived from the function itself: the signature and type hints give the
parameters, the first paragraph of the docstring describes the tool, and a Google-style
`Args:` section describes each parameter. Or it is given explicitly in the OpenAI
`tools` shape with `Tool.from_openai`.
"""
import enum
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?|See Also|Attributes)\s*:\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\(.*\))?\s*:\s*(.*)$")
_SIMPLE_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", dict: "object"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    function: Callable[..., Any] | None = None

    @classmethod
    def from_openai(cls, spec: dict[str, Any], function: Callable[..., Any] | None = None) -> "Tool":
        """A tool from an OpenAI `tools` entry: {"type": "function", "function": {"name", "description", "parameters"}}."""
        spec = spec.get("function", spec)
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"tool spec has no name: {spec!r}")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description", ""), parameters, function)

    def to_phi(self) -> dict[str, Any]:
        """The entry for this tool in the list Phi-4-mini reads between <|tool|> and <|/tool|>."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def tool_from_function(function: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
    """Build a Tool from a type-hinted, documented Python function."""
    name = name or getattr(function, "__name__", "")
    if not name or name == "<lambda>":
        raise ValueError("a tool needs a name: pass name= for lambdas and callables without __name__")
    summary, arg_docs = parse_docstring(inspect.getdoc(function) or "")
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required = []
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue  # *args/**kwargs cannot be described to the model
        if param.kind == param.POSITIONAL_ONLY:
            raise TypeError(f"{name}: parameter {param.name!r} is positional-only; tools are called with keywords")
        has_default = param.default is not param.empty
        try:
            prop = _parameter_schema(hints.get(param.name, str), optional=has_default)
        except TypeError as exc:
            raise TypeError(f"{name}: parameter {param.name!r}: {exc}; give the schema with Tool.from_openai") from None
        if param.name in arg_docs:
            prop = {"description": arg_docs[param.name], **prop}
        if has_default and param.default is not None and _is_json(param.default):
            prop["default"] = param.default
        properties[param.name] = prop
        if not has_default:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return Tool(name, description if description is not None else summary, parameters, function)


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph (as one line) and the `Args:` descriptions of a Google-style docstring."""
    lines = doc.strip().splitlines()
    summary = []
    for line in lines:
        if not line.strip() or _SECTION.match(line):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    in_args = False
    arg_indent = None
    current = None
    for line in lines:
        section = _SECTION.match(line)
        if section:
            in_args = section.group(1) in ("Args", "Arguments", "Parameters")
            arg_indent, current = None, None
            continue
        if not in_args or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if arg_indent is None:
            arg_indent = indent
        if indent < arg_indent:  # dedented text ends the section
            in_args = False
            continue
        match = _ARG_LINE.match(line.strip())
        if indent == arg_indent and match:
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current:  # a continuation line of the current argument
            args[current] = (args[current] + " " + line.strip()).strip()
    return " ".join(summary), args


def type_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema for a Python type: str, int, float, bool, Literal, list[...], dict, Enum, unions."""
    if annotation in (Any, inspect.Parameter.empty):
        # An unknown type becomes a string: what a model most naturally passes, and a
        # schema the grammar can constrain (an empty schema would mean "any object").
        return {"type": "string"}
    if annotation in _SIMPLE_TYPES:
        return {"type": _SIMPLE_TYPES[annotation]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_schema([member.value for member in annotation])
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return _enum_schema(list(args))
    if annotation in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1 and Ellipsis not in args:
            raise TypeError(f"fixed-length tuples are not supported: {annotation}")
        return {"type": "array", "items": type_schema(items[0])} if items else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if origin in (Union, types.UnionType):
        members = [type_schema(a) for a in args]
        if {m.get("type") for m in members} == {"integer", "number"} and all(len(m) == 1 for m in members):
            return {"type": "number"}  # int | float: every integer is a number
        return members[0] if len(members) == 1 else {"anyOf": members}
    raise TypeError(f"no JSON schema for type {annotation!r}")


def _parameter_schema(annotation: Any, optional: bool) -> dict[str, Any]:
    # Optional[X] with a default is just an X the model may leave out; without a default
    # the model must send it, possibly as null.
    if typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = type_schema(Union[tuple(rest)]) if rest else {"type": "null"}
        return inner if optional else {"anyOf": [inner, {"type": "null"}]}
    return type_schema(annotation)


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    kinds = {_json_type(v) for v in values}
    return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return "string" if isinstance(value, str) else "object"


def _is_json(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or (
        isinstance(value, (list, tuple)) and all(_is_json(v) for v in value)
    )
