"""A forgiving reader for the almost-JSON that small models write in tool calls.

`json.loads` is always tried first; this is the fallback. On top of JSON it accepts
single-quoted strings, Python's True/False/None, trailing commas, unquoted keys and
bare-word values, raw newlines in strings, missing closing brackets at the end of the
text, and closing brackets that do not match (they close whatever is open).
"""
import json
import re
from typing import Any

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_$][\w$.-]*")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"', "'": "'"}
_CLOSERS = "}]"


class LenientJSONError(ValueError):
    """No JSON-like value could be read at this position."""


def loads(text: str) -> Any:
    """Parse one JSON-like value: strict JSON if possible, else the first value leniently."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        pass
    reader = _Reader(text)
    reader.skip_space()
    return reader.value()


def read_values(text: str, start: int = 0) -> tuple[list[Any], int]:
    """Read the objects and arrays that follow `start`, separated by commas or spaces.

    Stray closing brackets between them are skipped (models often close one time too many).
    Reading stops at the first thing that is not an object or array, or at a value that
    cannot be read. Returns the values and the position just after the last one read.
    """
    reader = _Reader(text, start)
    values: list[Any] = []
    end = start
    while True:
        reader.skip_space(also=",")
        while reader.peek() and reader.peek() in _CLOSERS:
            reader.pos += 1
            end = reader.pos
            reader.skip_space(also=",")
        if reader.peek() not in ("{", "["):
            return values, end
        try:
            values.append(reader.value())
        except (LenientJSONError, RecursionError):
            return values, end
        end = reader.pos


class _Reader:
    def __init__(self, text: str, pos: int = 0):
        self.text = text
        self.pos = pos

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self, also: str = "") -> None:
        while self.pos < len(self.text) and (self.text[self.pos].isspace() or self.text[self.pos] in also):
            self.pos += 1

    def value(self) -> Any:
        char = self.peek()
        if char == "{":
            return self.container("}")
        if char == "[":
            return self.container("]")
        if char in ('"', "'"):
            return self.string()
        if number := _NUMBER.match(self.text, self.pos):
            self.pos = number.end()
            literal = number.group()
            return float(literal) if any(c in literal for c in ".eE") else int(literal)
        if word := _WORD.match(self.text, self.pos):
            self.pos = word.end()
            # An unquoted word is a literal if it is one, else a string: {"unit": celsius}.
            return _LITERALS.get(word.group(), word.group())
        raise LenientJSONError(f"no value at position {self.pos}")

    def container(self, closer: str) -> dict | list:
        self.pos += 1  # the opening bracket
        result: dict | list = {} if closer == "}" else []
        while True:
            self.skip_space(also=",")
            char = self.peek()
            if not char:  # the text ended: close everything still open
                return result
            if char in _CLOSERS:
                # A wrong closer ends this container but is left for the enclosing one.
                if char == closer:
                    self.pos += 1
                return result
            if isinstance(result, list):
                result.append(self.value())
                continue
            key = self.value()
            if isinstance(key, (dict, list)):
                raise LenientJSONError(f"object key expected at position {self.pos}")
            self.skip_space()
            if self.peek() in (":", "="):
                self.pos += 1
                self.skip_space()
                result[str(key)] = self.value() if self.peek() and self.peek() not in _CLOSERS else None
            else:
                result[str(key)] = None

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char != "\\":
                out.append(char)
                continue
            escaped = self.text[self.pos : self.pos + 1]
            self.pos += 1
            if escaped == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", self.text[self.pos : self.pos + 4]):
                out.append(chr(int(self.text[self.pos : self.pos + 4], 16)))
                self.pos += 4
            else:
                out.append(_ESCAPES.get(escaped, escaped))
        return "".join(out)  # unterminated: the text ended inside the string
