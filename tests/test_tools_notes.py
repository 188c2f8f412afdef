"""Notes persist, survive new instances, and a damaged file is never overwritten."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tools.notes import (MAX_NOTE_CHARS, NoteBook, NotesFileCorrupt, default_notes_path,
                         make_note_tools)


@pytest.fixture
def notes_path(tmp_path):
    return tmp_path / "data" / "notes.json"


@pytest.fixture
def book(notes_path):
    return NoteBook(notes_path)


def test_add_list_search_delete(book):
    first = book.add_note("Buy oat milk", tags=["Shopping"])
    second = book.add_note("Call the dentist on Monday")
    assert (first["id"], second["id"]) == (1, 2)
    assert first["tags"] == ["shopping"]
    assert [note["id"] for note in book.list_notes()] == [2, 1]
    assert [note["id"] for note in book.search_notes("MILK oat")] == [1]
    assert [note["id"] for note in book.search_notes("shopping")] == [1]
    assert book.search_notes("milk dentist") == []
    assert book.delete_note(1) == "deleted note 1"
    assert [note["id"] for note in book.list_notes()] == [2]


def test_notes_persist_across_instances(notes_path):
    NoteBook(notes_path).add_note("remember the milk")
    again = NoteBook(notes_path)
    assert [note["text"] for note in again.list_notes()] == ["remember the milk"]
    assert json.loads(notes_path.read_text())["notes"][0]["text"] == "remember the milk"


def test_ids_are_never_reused(book):
    book.add_note("one")
    book.add_note("two")
    book.delete_note(2)
    assert book.add_note("three")["id"] == 3


def test_missing_file_is_an_empty_notebook_and_is_not_created_by_reading(book, notes_path):
    assert book.list_notes() == []
    assert book.search_notes("anything") == []
    assert not notes_path.exists()


def test_list_limit(book):
    for n in range(5):
        book.add_note(f"note {n}")
    assert [note["text"] for note in book.list_notes(limit=2)] == ["note 4", "note 3"]
    with pytest.raises(ValueError, match="limit"):
        book.list_notes(limit=0)
    with pytest.raises(ValueError, match="limit"):
        book.list_notes(limit=10_000)


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   \n", "empty"), ("x" * (MAX_NOTE_CHARS + 1), "too long"), (None, "string"),
])
def test_bad_note_text(book, text, message):
    with pytest.raises(ValueError, match=message):
        book.add_note(text)


@pytest.mark.parametrize("tags, message", [
    ("shopping", "list of strings"), ([1, 2], "list of strings"),
    ([f"t{n}" for n in range(11)], "too many tags"), (["x" * 41], "too long"),
])
def test_bad_tags(book, tags, message):
    with pytest.raises(ValueError, match=message):
        book.add_note("text", tags=tags)


def test_delete_unknown_or_bad_id(book):
    book.add_note("keep me")
    with pytest.raises(ValueError, match="no note with id 7"):
        book.delete_note(7)
    with pytest.raises(ValueError, match="whole number"):
        book.delete_note("1; DROP TABLE")
    assert book.delete_note("1") == "deleted note 1"


def test_empty_search_is_refused(book):
    with pytest.raises(ValueError, match="empty"):
        book.search_notes("  ")


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe garbage", b"[]", b'{"version": 99, "next_id": 1, "notes": []}',
    b'{"version": 1, "next_id": 1, "notes": [{"id": 5, "text": "x"}]}', b"",
])
def test_corrupt_file_is_reported_kept_and_backed_up(notes_path, content):
    notes_path.parent.mkdir(parents=True)
    notes_path.write_bytes(content)
    book = NoteBook(notes_path)
    with pytest.raises(NotesFileCorrupt, match="damaged") as error:
        book.add_note("this must not replace the damaged file")
    assert notes_path.read_bytes() == content
    backup = notes_path.with_name("notes.json.corrupt")
    assert backup.read_bytes() == content
    assert str(backup) in str(error.value)
    with pytest.raises(NotesFileCorrupt):
        book.list_notes()
    with pytest.raises(NotesFileCorrupt):
        book.delete_note(1)
    assert notes_path.read_bytes() == content


def test_a_second_different_corruption_gets_its_own_backup(notes_path):
    notes_path.parent.mkdir(parents=True)
    notes_path.write_bytes(b"first damage")
    with pytest.raises(NotesFileCorrupt):
        NoteBook(notes_path).list_notes()
    notes_path.write_bytes(b"second damage")
    with pytest.raises(NotesFileCorrupt):
        NoteBook(notes_path).list_notes()
    backups = sorted(path.read_bytes() for path in notes_path.parent.glob("notes.json.corrupt*"))
    assert backups == [b"first damage", b"second damage"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(book, notes_path, monkeypatch):
    book.add_note("precious")
    before = notes_path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        book.add_note("never written")
    assert notes_path.read_bytes() == before
    # Nothing but the notes and the (empty, permanent) cross-process lock file beside them.
    assert sorted(path.name for path in notes_path.parent.iterdir()) == ["notes.json", "notes.json.lock"]


def test_concurrent_adds_lose_nothing(book):
    threads = [threading.Thread(target=book.add_note, args=(f"note {n}",)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(note["id"] for note in book.list_notes(limit=50)) == list(range(1, 21))


def test_unicode_round_trips(book, notes_path):
    book.add_note("café ☕ 東京")
    assert NoteBook(notes_path).search_notes("東京")[0]["text"] == "café ☕ 東京"


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_notes_path() == tmp_path / "phi4mm" / "notes.json"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_notes_path() == tmp_path / ".local" / "share" / "phi4mm" / "notes.json"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert NoteBook().path == tmp_path / ".local" / "share" / "phi4mm" / "notes.json"


def test_factory_tools_are_plain_functions_on_the_same_file(notes_path):
    add_note, list_notes, search_notes, delete_note = make_note_tools(notes_path)
    assert [tool.__name__ for tool in (add_note, list_notes, search_notes, delete_note)] == [
        "add_note", "list_notes", "search_notes", "delete_note"]
    add_note("from the factory")
    assert list_notes()[0]["text"] == "from the factory"
    assert NoteBook(notes_path).search_notes("factory")


# --- several processes on one notes file (the web page and the voice assistant) ---------

REPO_ROOT = Path(__file__).resolve().parent.parent

# Waits for the go file so both processes add at the same time, then adds 50 notes.
ADDER = """
import sys, time
from pathlib import Path
from tools.notes import NoteBook
path, label, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
book = NoteBook(path)
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
for n in range(50):
    book.add_note(f"{label} {n}")
"""


def _start_adder(notes_path, label, go_file):
    return subprocess.Popen([sys.executable, "-c", ADDER, str(notes_path), label, str(go_file)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_adding_at_once_lose_nothing(book, notes_path, tmp_path):
    for n in range(3):
        book.add_note(f"already there {n}")
    go_file = tmp_path / "go"
    adders = [_start_adder(notes_path, label, go_file) for label in ("page", "voice")]
    time.sleep(0.5)  # both interpreters have imported tools.notes by now, or nearly
    go_file.touch()
    for adder in adders:
        _, err = adder.communicate(timeout=60)
        assert adder.returncode == 0, err.decode()
    notes = book.list_notes(limit=200)
    texts = {note["text"] for note in notes}
    assert texts == ({f"already there {n}" for n in range(3)}
                     | {f"{label} {n}" for label in ("page", "voice") for n in range(50)})
    ids = [note["id"] for note in notes]
    assert sorted(ids) == list(range(1, 104))  # every note got its own id


def test_a_write_killed_before_the_replace_leaves_the_old_notebook_readable(book, notes_path,
                                                                            monkeypatch):
    book.add_note("precious")
    before = notes_path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped between temp file and rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        book.add_note("never written")
    monkeypatch.undo()
    assert notes_path.read_bytes() == before
    assert [note["text"] for note in NoteBook(notes_path).list_notes()] == ["precious"]
    assert not list(notes_path.parent.glob("*.tmp"))
    # The cross-process lock was released: another process can write at once.
    add_one = "import sys; from tools.notes import NoteBook; NoteBook(sys.argv[1]).add_note('from elsewhere')"
    done = subprocess.run([sys.executable, "-c", add_one, str(notes_path)],
                          cwd=REPO_ROOT, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert [note["text"] for note in book.list_notes()] == ["from elsewhere", "precious"]


def test_the_lock_is_held_across_the_whole_read_modify_write(notes_path, tmp_path):
    """A process holding the notes lock makes another process's add wait, not overwrite."""
    NoteBook(notes_path).add_note("first")
    hold_then_add = """
import sys, time
from tools.notes import NoteBook
book = NoteBook(sys.argv[1])
with book._locked():
    data = book._load()
    print("locked", flush=True)
    time.sleep(1.0)
    data["notes"].append({"id": data["next_id"], "text": "held", "tags": []})
    data["next_id"] += 1
    book._save(data)
"""
    holder = subprocess.Popen([sys.executable, "-c", hold_then_add, str(notes_path)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    NoteBook(notes_path).add_note("waited")  # must block until the holder has saved
    _, err = holder.communicate(timeout=30)
    assert holder.returncode == 0, err.decode()
    assert [note["text"] for note in NoteBook(notes_path).list_notes()] == ["waited", "held", "first"]


def test_corrupt_file_is_reported_by_the_tool(notes_path):
    notes_path.parent.mkdir(parents=True)
    notes_path.write_text('{"version": 1, "next_id": 2, "notes": [{"id": 1, "te')  # cut short
    add_note, list_notes, search_notes, delete_note = make_note_tools(notes_path)
    for call in (lambda: add_note("x"), list_notes, lambda: search_notes("x"), lambda: delete_note(1)):
        with pytest.raises(NotesFileCorrupt, match=r"is damaged \(not valid JSON") as error:
            call()
        assert "left untouched" in str(error.value) and "notes.json.corrupt" in str(error.value)
    assert notes_path.read_text().endswith('"te')
