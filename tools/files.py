"""Reading and listing text files inside one sandbox folder, and nowhere else.

Paths from the model are untrusted. A path must be relative, must not contain
"..", and its real location (every symlink resolved) must lie inside the real
sandbox root, so a link pointing outside is refused like any other escape.
Only regular UTF-8 text files are read, and at most 64 KiB of one.
"""
# No `from __future__ import annotations`: the agent reads tool annotations as real types.
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Union

from tools.binding import tool_from_method

MAX_READ_BYTES = 64 * 1024
MAX_LISTED_ENTRIES = 500


def _truncated_utf8(data: bytes) -> str:
    """Decode UTF-8 that may end mid-character because it was cut at a byte limit."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the limit is at most 3 bytes from the end.
        if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
            return data[:exc.start].decode("utf-8")
        raise


class FileSandbox:
    """One folder the assistant may look into, and the tools that do so."""

    def __init__(self, root: Union[str, os.PathLike]):
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise NotADirectoryError(f"sandbox folder {root_path} does not exist or is not a folder")
        self.root = root_path.resolve(strict=True)

    def _resolve(self, path: str) -> Path:
        """The real path of `path` inside the sandbox; PermissionError for any way out."""
        if not isinstance(path, str):
            raise ValueError("path must be a string")
        if "\0" in path:
            raise ValueError("path contains a NUL character")
        path = path.strip() or "."
        # Check both conventions: "C:\\x" or "\\\\server\\x" is absolute on Windows only.
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).anchor:
            raise PermissionError(f"absolute paths are not allowed ({path!r}); "
                                  "give a path relative to the sandbox folder")
        if ".." in PurePosixPath(path.replace("\\", "/")).parts:
            raise PermissionError(f"'..' is not allowed in paths ({path!r})")
        try:
            real = (self.root / path).resolve(strict=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file or folder in the sandbox: {path!r}") from None
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
            raise FileNotFoundError(f"cannot resolve {path!r}: {exc}") from None
        if not real.is_relative_to(self.root):
            raise PermissionError(f"{path!r} leads outside the sandbox folder (through a symlink)")
        return real

    def _describe_entry(self, entry: Path) -> str:
        name = entry.relative_to(self.root).as_posix()
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            return f"{name} (broken link)"
        if not real.is_relative_to(self.root):
            return f"{name} (link outside the sandbox, not readable)"
        if real.is_dir():
            return f"{name}/"
        if real.is_file():
            return f"{name} ({real.stat().st_size} bytes)"
        return f"{name} (special file, not readable)"

    def list_files(self, path: str = ".", recursive: bool = False) -> list[str]:
        """List the files and folders in a folder of the sandbox; folders end with "/", files show their size.

        Args:
            path: Folder to list, relative to the sandbox root; "." is the root itself.
            recursive: Also list everything in subfolders (symlinked folders are not entered).

        Returns:
            One entry per file or folder, as paths relative to the sandbox root (at most 500).
        """
        folder = self._resolve(path)
        if not folder.is_dir():
            raise NotADirectoryError(f"{path!r} is a file, not a folder; use read_file to read it")
        if recursive:
            entries = (Path(parent) / name
                       for parent, dirs, files in os.walk(folder)
                       for name in sorted(dirs) + sorted(files))
        else:
            entries = iter(sorted(folder.iterdir()))
        listing = []
        for entry in entries:
            if len(listing) == MAX_LISTED_ENTRIES:
                listing.append(f"... more entries not shown (limit {MAX_LISTED_ENTRIES}); list a subfolder")
                break
            listing.append(self._describe_entry(entry))
        return listing

    def read_file(self, path: str, max_bytes: int = MAX_READ_BYTES) -> str:
        """Read a UTF-8 text file from the sandbox; long files are cut off with a note saying so.

        Args:
            path: File to read, relative to the sandbox root.
            max_bytes: Read at most this many bytes (1 to 65536).

        Returns:
            The text of the file.
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) \
                or not 1 <= max_bytes <= MAX_READ_BYTES:
            raise ValueError(f"max_bytes must be a whole number from 1 to {MAX_READ_BYTES}")
        real = self._resolve(path)
        if real.is_dir():
            raise IsADirectoryError(f"{path!r} is a folder; use list_files to see what is in it")
        # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: the file must not
        # have been swapped for a symlink since it was resolved.
        flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_BINARY", 0))
        fd = os.open(real, flags)
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise PermissionError(f"{path!r} is not a regular file")
            data = file.read(max_bytes + 1)
        if b"\0" in data:  # NUL never occurs in text, and is in nearly every binary format
            raise ValueError(f"{path!r} looks like a binary file; only text files can be read")
        truncated = len(data) > max_bytes
        data = data[:max_bytes]
        try:
            text = _truncated_utf8(data) if truncated else data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path!r} is not UTF-8 text; only text files can be read") from None
        text = text.removeprefix("\ufeff")
        if not text:
            return "[the file is empty]"
        if truncated:
            text += f"\n[truncated: showed the first {max_bytes} of {info.st_size} bytes]"
        return text

    def tools(self) -> list[Callable[..., Any]]:
        """The sandbox's tools as plain functions, ready for the agent."""
        return [tool_from_method(self.list_files), tool_from_method(self.read_file)]


def make_file_tools(root: Union[str, os.PathLike]) -> list[Callable[..., Any]]:
    """list_files and read_file confined to the folder `root`."""
    return FileSandbox(root).tools()
