"""Every built-in tool carries what the agent needs to build its JSON schema."""
import inspect
import json
import re
import typing

import pytest

from tools import builtin_tools

ALL_TOOLS = ["calculate", "current_time", "convert_time", "convert_units", "add_note",
             "list_notes", "search_notes", "delete_note", "list_files", "read_file"]


@pytest.fixture
def tools(tmp_path):
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "sandbox" / "a.txt").write_text("alpha")
    return builtin_tools(notes_path=tmp_path / "notes.json", sandbox=tmp_path / "sandbox")


def documented_args(doc: str) -> dict[str, str]:
    """The `name: description` lines of a Google-style Args: section."""
    section = re.search(r"^\s*Args:\s*\n(.*?)(?:^\s*\w+:\s*$|\Z)", doc, re.S | re.M)
    assert section, "no Args: section"
    return dict(re.findall(r"^\s+(\w+): (.+)$", section.group(1), re.M))


def test_registry_names(tools):
    assert sorted(tools) == sorted(ALL_TOOLS)
    assert all(tools[name].__name__ == name for name in tools)


def test_file_tools_only_with_a_sandbox(tmp_path):
    tools = builtin_tools(notes_path=tmp_path / "notes.json")
    assert "read_file" not in tools and "list_files" not in tools


@pytest.mark.parametrize("name", ALL_TOOLS)
def test_schema_material(tools, name):
    tool = tools[name]
    assert inspect.isfunction(tool)
    signature = inspect.signature(tool)
    hints = typing.get_type_hints(tool)
    assert "self" not in signature.parameters
    assert set(signature.parameters) | {"return"} == set(hints)
    description = inspect.getdoc(tool).split("\n\n")[0]
    assert len(description) > 20
    assert set(documented_args(inspect.getdoc(tool))) == set(signature.parameters)


def test_tools_accept_attributes(tools, monkeypatch):
    # The agent may annotate functions; bound methods would refuse (AttributeError). Each tool
    # keeps its own annotation: no two names share one function object.
    for name, tool in tools.items():
        monkeypatch.setattr(tool, "schema_cache", {"tool": name}, raising=False)
    for name, tool in tools.items():
        assert inspect.isfunction(tool) and not inspect.ismethod(tool), name
        assert tool.schema_cache == {"tool": name}
        assert tool.__dict__["schema_cache"] is tool.schema_cache
    assert len({id(tool) for tool in tools.values()}) == len(tools)


def test_results_are_json_serialisable(tools):
    results = [
        tools["calculate"]("2 + 2"),
        tools["current_time"]("Europe/Paris"),
        tools["convert_time"]("10:00", "UTC", "Asia/Tokyo"),
        tools["convert_units"](1, "km", "m"),
        tools["add_note"]("hi", ["x"]),
        tools["list_notes"](),
        tools["search_notes"]("hi"),
        tools["delete_note"](1),
        tools["list_files"](),
        tools["read_file"]("a.txt"),
    ]
    # Strict JSON (no NaN/Infinity) that reads back unchanged: no tuples, no non-string keys.
    assert json.loads(json.dumps(results, allow_nan=False)) == results
    assert results[0] == "4" and "1000" in results[3] and results[-1] == "alpha"
    assert results[1]["timezone"] == "Europe/Paris" and results[2]["to"]["time"] == "19:00:00"
    note = results[4]
    assert note["text"] == "hi" and note["tags"] == ["x"] and results[5] == results[6] == [note]
    assert "1" in results[7] and any("a.txt" in entry for entry in results[8])
