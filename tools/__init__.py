"""Built-in tools the assistant can call.

Each tool is a plain function with type hints and a Google-style docstring; the
agent loop derives the tool's JSON schema from them and turns any exception a
tool raises into an error result for the model.

    calculate(expression)                 safe arithmetic and math functions (tools.calculator)
    current_time(timezone="UTC")          date, time and weekday in a time zone (tools.clock)
    convert_time(time, from_timezone, to_timezone)
                                          a clock time in another zone, DST-aware (tools.clock)
    convert_units(value, from_unit, to_unit)
                                          length, mass, volume, temperature, data... (tools.units)
    add_note(text, tags=None)             save a note to the local notes file (tools.notes)
    list_notes(limit=20)                  newest notes first
    search_notes(query)                   notes containing all query words
    delete_note(note_id)                  remove a note by id
    list_files(path=".", recursive=False) list a folder inside the sandbox (tools.files)
    read_file(path, max_bytes=65536)      read a text file inside the sandbox

The file tools exist only when a sandbox folder is given: the assistant never
sees the file system by default.
"""
import os
from typing import Any, Callable, Union

from tools.calculator import calculate
from tools.clock import convert_time, current_time
from tools.files import make_file_tools
from tools.notes import make_note_tools
from tools.units import convert_units

Tool = Callable[..., Any]


def builtin_tools(notes_path: Union[str, os.PathLike, None] = None,
                  sandbox: Union[str, os.PathLike, None] = None) -> dict[str, Tool]:
    """Tool name -> function for every built-in tool.

    notes_path: the notes file (default: $XDG_DATA_HOME/phi4mm/notes.json).
    sandbox: the only folder the file tools may read; without it there are no file tools.
    """
    tools: list[Tool] = [calculate, current_time, convert_time, convert_units]
    tools += make_note_tools(notes_path)
    if sandbox is not None:
        tools += make_file_tools(sandbox)
    return {tool.__name__: tool for tool in tools}


__all__ = ["builtin_tools", "calculate", "current_time", "convert_time", "convert_units",
           "make_note_tools", "make_file_tools"]
