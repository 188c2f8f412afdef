"""Notes the assistant keeps for the user, persisted in one local JSON file.

The file is rewritten atomically (temporary file, fsync, os.replace), so a crash
leaves either the old notes or the new ones, never half a file. Several processes
may share the file (the web page and the voice assistant do): every operation holds
an exclusive lock on "<notes file>.lock" beside it, so read-modify-write cycles of
different processes never interleave and no note is lost. A file that is
not a valid notebook is never overwritten: every operation stops with a clear
error and a copy of the bad file is kept next to it for the user to inspect.

    {"version": 1, "next_id": 4, "notes": [{"id": 3, "text": "...", "tags": [], "created": "..."}]}

Ids are never reused, so "delete note 3" cannot hit a newer note by accident.
"""
# No `from __future__ import annotations`: the agent reads tool annotations as real types.
import datetime as dt
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tools.binding import tool_from_method

FORMAT_VERSION = 1
MAX_NOTE_CHARS = 4_000
MAX_NOTES = 5_000
MAX_TAGS = 10
MAX_TAG_CHARS = 40
MAX_LISTED = 200

# One lock for every notebook: tools may run in worker threads, and two
# read-modify-write cycles on the same file must not interleave. It only works
# inside one process; the lock file (NoteBook._locked) covers other processes.
_FILE_LOCK = threading.RLock()
_HOLDING = threading.local()  # .paths: lock files this thread holds (a nested _locked must not lock again)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None


def _lock_fd(fd: int) -> None:
    """Block until this process holds the exclusive lock on the open lock file `fd`."""
    if fcntl is not None:
        # flock locks belong to the open file description: a process that dies
        # releases them, and two opens of the file in one process exclude each other.
        fcntl.flock(fd, fcntl.LOCK_EX)
    elif msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)  # msvcrt locks bytes from the current position
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:  # held by another process: wait, as flock does
                time.sleep(0.01)
    # Elsewhere (neither API exists) only the in-process lock protects the file:
    # two processes writing notes at the same moment may lose one of the notes.


def _unlock_fd(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class NotesFileCorrupt(ValueError):
    """The notes file exists but is not a notebook this code wrote."""


def default_notes_path() -> Path:
    """$XDG_DATA_HOME/phi4mm/notes.json, falling back to ~/.local/share as the XDG spec says."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The spec says to ignore a relative XDG_DATA_HOME.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "phi4mm" / "notes.json"


def _empty_notebook() -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "next_id": 1, "notes": []}


def _problem_with(data: Any) -> Optional[str]:
    """Why `data` is not a valid notebook, or None if it is."""
    if not isinstance(data, dict):
        return "top level is not an object"
    if data.get("version") != FORMAT_VERSION:
        return f"unknown format version {data.get('version')!r}"
    if not isinstance(data.get("next_id"), int) or not isinstance(data.get("notes"), list):
        return "missing 'next_id' or 'notes'"
    for note in data["notes"]:
        if not (isinstance(note, dict) and isinstance(note.get("id"), int)
                and isinstance(note.get("text"), str) and isinstance(note.get("tags", []), list)):
            return "a note is malformed"
        if note["id"] >= data["next_id"]:
            return "a note id is not below next_id"
    return None


def _clean_text(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError("note text must be a string")
    text = text.strip()
    if not text:
        raise ValueError("note text is empty")
    if len(text) > MAX_NOTE_CHARS:
        raise ValueError(f"note is too long ({len(text)} characters, max {MAX_NOTE_CHARS})")
    return text


def _clean_tags(tags: Optional[list[str]]) -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ValueError("tags must be a list of strings")
    cleaned = list(dict.fromkeys(tag.strip().lower() for tag in tags if tag.strip()))
    if len(cleaned) > MAX_TAGS:
        raise ValueError(f"too many tags ({len(cleaned)}, max {MAX_TAGS})")
    too_long = [tag for tag in cleaned if len(tag) > MAX_TAG_CHARS]
    if too_long:
        raise ValueError(f"tag {too_long[0][:50]!r}... is too long (max {MAX_TAG_CHARS} characters)")
    return cleaned


def _as_note_id(note_id: Union[int, str]) -> int:
    # Models sometimes send ids as strings ("3"); accept those, refuse the rest.
    if isinstance(note_id, str) and note_id.strip().isdigit():
        return int(note_id)
    if isinstance(note_id, bool) or not isinstance(note_id, int):
        raise ValueError(f"note_id must be a whole number, got {note_id!r}")
    return note_id


class NoteBook:
    """A notes file and the tools that read and change it."""

    def __init__(self, path: Union[str, os.PathLike, None] = None):
        self.path = Path(path).expanduser() if path is not None else default_notes_path()

    # --- storage -------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        """The lock file beside the notes file; it stays there, empty, between uses."""
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def _locked(self, create: bool = True) -> Iterator[None]:
        """Hold the notebook for one operation, against other threads and other processes.

        Deleting or replacing the lock file would let two processes lock different
        files, so it is created once and never removed. Readers lock too: on Windows
        os.replace fails while another process has the notes file open, and a reader
        that finds a damaged file writes the backup copy. With `create` false (reading)
        a missing folder is not created: there is nothing to read, so nothing to lock.
        """
        with _FILE_LOCK:
            held = _HOLDING.__dict__.setdefault("paths", set())
            lock_path = self.lock_path.absolute()
            if lock_path in held or (not create and not self.path.parent.is_dir()):
                yield
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
            fd = os.open(lock_path, flags, 0o600)
            try:
                _lock_fd(fd)
                held.add(lock_path)
                try:
                    yield
                finally:
                    held.discard(lock_path)
                    _unlock_fd(fd)
            finally:
                os.close(fd)

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _empty_notebook()
        try:
            data = json.loads(raw.decode("utf-8"))
            problem = _problem_with(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"not valid JSON: {exc}"
        if problem:
            backup = self._keep_copy_of_corrupt(raw)
            raise NotesFileCorrupt(
                f"the notes file {self.path} is damaged ({problem}). It was left untouched and a "
                f"copy was saved as {backup}. Repair it, or move it away to start a new notebook.")
        return data

    def _keep_copy_of_corrupt(self, raw: bytes) -> Path:
        backup = self.path.with_name(self.path.name + ".corrupt")
        if backup.exists() and backup.read_bytes() != raw:
            stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
            backup = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        if not backup.exists():
            backup.write_bytes(raw)
        return backup

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as temp:
                json.dump(data, temp, ensure_ascii=False, indent=1)
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_name, self.path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        self._sync_directory()

    def _sync_directory(self) -> None:
        # Makes the rename itself durable; not possible (nor needed) on Windows.
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    # --- tools -----------------------------------------------------------------

    def add_note(self, text: str, tags: Optional[list[str]] = None) -> dict:
        """Save a note for the user so it can be found again later.

        Args:
            text: The note to save, at most 4000 characters.
            tags: Optional keywords to file the note under, e.g. ["shopping"].

        Returns:
            The saved note with its id.
        """
        text, tags = _clean_text(text), _clean_tags(tags)
        with self._locked():
            data = self._load()
            if len(data["notes"]) >= MAX_NOTES:
                raise ValueError(f"the notebook is full ({MAX_NOTES} notes); delete some first")
            note = {"id": data["next_id"], "text": text, "tags": tags,
                    "created": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
            data["notes"].append(note)
            data["next_id"] += 1
            self._save(data)
        return note

    def list_notes(self, limit: int = 20) -> list[dict]:
        """List the user's saved notes, newest first.

        Args:
            limit: How many notes to return at most (1 to 200).

        Returns:
            The notes, each with id, text, tags and creation time.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LISTED:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LISTED}")
        with self._locked(create=False):
            notes = self._load()["notes"]
        return list(reversed(notes))[:limit]

    def search_notes(self, query: str) -> list[dict]:
        """Find saved notes containing all the words of a query (case-insensitive), newest first.

        Args:
            query: Words to look for in the notes' text and tags.

        Returns:
            The matching notes (at most 200).
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("search query is empty")
        words = query.casefold().split()
        with self._locked(create=False):
            notes = self._load()["notes"]
        matches = []
        for note in reversed(notes):
            haystack = " ".join([note["text"], *note.get("tags", [])]).casefold()
            if all(word in haystack for word in words):
                matches.append(note)
        return matches[:MAX_LISTED]

    def delete_note(self, note_id: int) -> str:
        """Delete one saved note by its id.

        Args:
            note_id: The id of the note, as shown by list_notes or search_notes.

        Returns:
            A confirmation.
        """
        note_id = _as_note_id(note_id)
        with self._locked():
            data = self._load()
            remaining = [note for note in data["notes"] if note["id"] != note_id]
            if len(remaining) == len(data["notes"]):
                raise ValueError(f"there is no note with id {note_id}")
            data["notes"] = remaining
            self._save(data)
        return f"deleted note {note_id}"

    def tools(self) -> list[Callable[..., Any]]:
        """The notebook's tools as plain functions, ready for the agent."""
        return [tool_from_method(method) for method in
                (self.add_note, self.list_notes, self.search_notes, self.delete_note)]


def make_note_tools(path: Union[str, os.PathLike, None] = None) -> list[Callable[..., Any]]:
    """add_note, list_notes, search_notes and delete_note on the notes file at `path`.

    Without a path the notes live in the user's data folder (see default_notes_path).
    """
    return NoteBook(path).tools()
