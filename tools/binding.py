"""Turn a bound method into a plain function tool.

Tools that carry state (a notes file, a sandbox folder) are methods of an
object. The agent derives each tool's schema from `__name__`, `__doc__`,
`inspect.signature` and `typing.get_type_hints`, and may set attributes on the
function; bound methods refuse attributes and some inspection code expects a
real function, so each method is wrapped in one that looks exactly like it
minus `self`.
"""
import functools
import inspect
from typing import Any, Callable


def tool_from_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function calling `method`, with its name, docstring, signature and type hints."""

    @functools.wraps(method)
    def tool(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    tool.__signature__ = inspect.signature(method)  # the bound signature: no `self`
    tool.__qualname__ = method.__name__
    return tool
