"""Reading and listing text files inside one sandbox folder, and nowhere else.

Paths from the model are untrusted. A path must be relative and must not contain
"..". It is then opened the `openat` way: one component at a time, each relative
to the folder already opened and without following symlinks (O_NOFOLLOW), so
swapping a folder for a symlink while a path is being opened cannot lead
outside. A symlink met on the way is followed by hand, only if it stays inside
the sandbox; one that points outside is refused like any other escape. Only
regular UTF-8 text files with a single name are read (a hard link may be another
name of a file outside the folder), and at most 64 KiB of one.

Where the platform lacks dir_fd / O_NOFOLLOW (Windows), the path is resolved
first and opened afterwards: a link swapped in between those two steps can
still lead outside there.
"""
# No `from __future__ import annotations`: the agent reads tool annotations as real types.
import collections
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Union

from tools.binding import tool_from_method

MAX_READ_BYTES = 64 * 1024
MAX_LISTED_ENTRIES = 500
MAX_SYMLINKS = 40  # as Linux: more links than this in one path is a loop

# Opening relative to a directory handle without following links needs openat
# (os.open with dir_fd), fstatat, readlinkat, fdopendir and O_NOFOLLOW/O_DIRECTORY:
# every POSIX system Python supports today, not Windows.
_OPENAT = (os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd
           and os.readlink in os.supports_dir_fd and os.scandir in os.supports_fd
           and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY"))
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO must not hang; O_NOCTTY: a terminal must not become ours.
_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
              | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC)
_FILE_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0) | _CLOEXEC)


class OutsideSandbox(PermissionError):
    """The path, through a symlink, leads outside the sandbox folder."""


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

    # --- paths -----------------------------------------------------------------

    @staticmethod
    def _check(path: str) -> str:
        """`path`, stripped ("" is "."), after refusing what is never allowed: absolute paths and ".."."""
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
        return path

    @staticmethod
    def _outside(path: str) -> OutsideSandbox:
        return OutsideSandbox(f"{path!r} leads outside the sandbox folder (through a symlink)")

    @staticmethod
    def _os_error(path: str, exc: OSError, folder_wanted: bool = False) -> OSError:
        """A clear error for a failed open or stat of `path`'s components."""
        if exc.errno == errno.ENOENT:
            return FileNotFoundError(f"no such file or folder in the sandbox: {path!r}")
        if exc.errno == errno.ENOTDIR:
            if folder_wanted:
                return NotADirectoryError(f"{path!r} is a file, not a folder; use read_file to read it")
            return FileNotFoundError(f"no such file or folder in the sandbox: {path!r} "
                                     "(a part of it is a file, not a folder)")
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # a symlink where none was a moment ago
            return FileNotFoundError(f"cannot resolve {path!r}: {exc.strerror}")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return PermissionError(f"{path!r} cannot be opened: permission denied")
        return exc

    # --- opening beneath the root without following links (POSIX) --------------

    def _walk(self, path: str, want: str) -> tuple[Any, list[str]]:
        """Open `path` (already _check'ed) beneath the root, one component at a time.

        Every component is opened relative to the folder opened before it, with
        O_NOFOLLOW, so no symlink is ever followed by the kernel: one that is met
        (there all along, or swapped in during the walk) is read with readlink
        and followed here, inside the sandbox only, ".." of a link target going
        back up the folders actually opened. `want` is "dir" (return an open
        folder), "file" (return an open regular file) or "stat" (return the
        lstat of what the path leads to, opening nothing at the end). Returned
        with it: the real path below the root, as a list of names.
        """
        pending = collections.deque(path.split("/"))
        # The root was resolved when the sandbox was made: it is trusted, not walked.
        stack = [("", os.open(self.root, _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0)))]
        links = 0
        try:
            while pending:
                name = pending.popleft()
                if name in ("", "."):
                    continue
                if name == "..":  # only from a link's target: _check refused it in `path`
                    if len(stack) == 1:
                        raise self._outside(path)
                    os.close(stack.pop()[1])
                    continue
                parent = stack[-1][1]
                last = all(part in ("", ".") for part in pending)
                if last and want != "dir":
                    try:
                        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    except OSError as exc:
                        raise self._os_error(path, exc) from None
                    if stat.S_ISLNK(info.st_mode):
                        links = self._follow_link(path, name, stack, pending, links)
                        continue
                    names = [folder for folder, _ in stack[1:]] + [name]
                    if want == "stat":
                        return info, names
                    if stat.S_ISDIR(info.st_mode):
                        raise IsADirectoryError(f"{path!r} is a folder; use list_files to see what is in it")
                    if not stat.S_ISREG(info.st_mode):  # refused before opening: a device may react to open
                        raise PermissionError(f"{path!r} is not a regular file")
                    try:
                        return os.open(name, _FILE_FLAGS, dir_fd=parent), names
                    except OSError as exc:
                        if not self._is_link(name, parent):
                            raise self._os_error(path, exc) from None
                        links = self._follow_link(path, name, stack, pending, links)  # swapped in since
                        continue
                try:
                    stack.append((name, os.open(name, _DIR_FLAGS, dir_fd=parent)))
                except OSError as exc:
                    if not self._is_link(name, parent):
                        raise self._os_error(path, exc, folder_wanted=last) from None
                    links = self._follow_link(path, name, stack, pending, links)
            # The path ends at a folder.
            names = [folder for folder, _ in stack[1:]]
            if want == "file":
                raise IsADirectoryError(f"{path!r} is a folder; use list_files to see what is in it")
            if want == "stat":
                return os.fstat(stack[-1][1]), names
            return stack.pop()[1], names
        finally:
            for _, fd in stack:
                os.close(fd)

    @staticmethod
    def _is_link(name: str, dir_fd: int) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _follow_link(self, path: str, name: str, stack: list[tuple[str, int]],
                     pending: "collections.deque[str]", links: int) -> int:
        """Put the target of symlink `name` (in the folder on top of `stack`) in front of `pending`."""
        links += 1
        if links > MAX_SYMLINKS:
            raise FileNotFoundError(f"cannot resolve {path!r}: too many levels of symbolic links")
        try:
            target = os.readlink(name, dir_fd=stack[-1][1])
        except OSError:  # no longer a link: look at `name` again
            pending.appendleft(name)
            return links
        if os.path.isabs(target):
            # Only used to find the names to walk from the root, which are then
            # opened like any others: what realpath sees cannot lead outside.
            real = Path(os.path.realpath(target))
            if not real.is_relative_to(self.root):
                raise self._outside(path)
            while len(stack) > 1:
                os.close(stack.pop()[1])
            parts: list[str] = list(real.relative_to(self.root).parts)
        else:
            parts = target.split("/")
        pending.extendleft(reversed(parts))
        return links

    def _describe(self, names: list[str], info: os.stat_result) -> tuple[str, bool]:
        """The listing line for the entry at `names` whose lstat is `info`, and whether it is a folder."""
        name = "/".join(names)
        if stat.S_ISLNK(info.st_mode):
            try:
                info, _ = self._walk(name, "stat")
            except OutsideSandbox:
                return f"{name} (link outside the sandbox, not readable)", False
            except OSError:
                return f"{name} (broken link)", False
        if stat.S_ISDIR(info.st_mode):
            return f"{name}/", True
        if stat.S_ISREG(info.st_mode):
            if info.st_nlink > 1:
                return f"{name} (hard-linked file, not readable)", False
            return f"{name} ({info.st_size} bytes)", False
        return f"{name} (special file, not readable)", False

    def _entries(self, fd: int, names: list[str], recursive: bool) -> Iterator[str]:
        """Listing lines of the open folder `fd` (closed at the end), at `names` below the root."""
        try:
            found = []
            with os.scandir(fd) as scan:
                for entry in scan:
                    try:
                        found.append((entry.name, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:  # removed since the folder was read
                        pass
            found.sort(key=lambda item: item[0])
            described = [(name, info, *self._describe(names + [name], info)) for name, info in found]
            if recursive:  # as os.walk: a folder's subfolders, then its files
                described.sort(key=lambda item: not item[3])
            for _, _, line, _ in described:
                yield line
            if not recursive:
                return
            for name, info, _, _ in described:
                if not stat.S_ISDIR(info.st_mode):  # symlinked folders are not entered
                    continue
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError:  # gone, swapped for a link, or unreadable: skipped, as os.walk does
                    continue
                yield from self._entries(child, names + [name], recursive)
        finally:
            os.close(fd)

    # --- check-then-open, where openat is missing (Windows) ---------------------

    def _resolve(self, path: str) -> Path:
        """The real path of `path` inside the sandbox; PermissionError for any way out.

        Resolving and then opening leaves a race (a folder swapped for a link in
        between); it is only used where the platform cannot open the openat way.
        """
        path = self._check(path)
        try:
            real = (self.root / path).resolve(strict=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file or folder in the sandbox: {path!r}") from None
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
            raise FileNotFoundError(f"cannot resolve {path!r}: {exc}") from None
        if not real.is_relative_to(self.root):
            raise self._outside(path)
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
            info = real.stat()
            if info.st_nlink > 1:
                return f"{name} (hard-linked file, not readable)"
            return f"{name} ({info.st_size} bytes)"
        return f"{name} (special file, not readable)"

    def _entries_by_path(self, path: str, recursive: bool) -> Iterator[str]:
        folder = self._resolve(path)
        if not folder.is_dir():
            raise NotADirectoryError(f"{path!r} is a file, not a folder; use read_file to read it")
        if recursive:
            entries = (Path(parent) / name
                       for parent, dirs, files in os.walk(folder)
                       for name in sorted(dirs) + sorted(files))
        else:
            entries = iter(sorted(folder.iterdir()))
        return (self._describe_entry(entry) for entry in entries)

    # --- tools -----------------------------------------------------------------

    def list_files(self, path: str = ".", recursive: bool = False) -> list[str]:
        """List the files and folders in a folder of the sandbox; folders end with "/", files show their size.

        Args:
            path: Folder to list, relative to the sandbox root; "." is the root itself.
            recursive: Also list everything in subfolders (symlinked folders are not entered).

        Returns:
            One entry per file or folder, as paths relative to the sandbox root (at most 500).
        """
        path = self._check(path)
        if _OPENAT:
            fd, names = self._walk(path, "dir")
            entries = self._entries(fd, names, recursive)
        else:
            entries = self._entries_by_path(path, recursive)
        listing: list[str] = []
        try:
            for entry in entries:
                if len(listing) == MAX_LISTED_ENTRIES:
                    listing.append(f"... more entries not shown (limit {MAX_LISTED_ENTRIES}); list a subfolder")
                    break
                listing.append(entry)
        finally:
            entries.close()  # closes the folders still open
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
        path = self._check(path)
        if _OPENAT:
            fd, _ = self._walk(path, "file")
        else:
            real = self._resolve(path)
            if real.is_dir():
                raise IsADirectoryError(f"{path!r} is a folder; use list_files to see what is in it")
            # Check-then-open: a folder of `path` swapped for a link since _resolve can lead
            # outside here. O_NOFOLLOW, where it exists, at least covers the file itself.
            fd = os.open(real, _FILE_FLAGS)
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise PermissionError(f"{path!r} is not a regular file")
            if info.st_nlink > 1:
                raise PermissionError(f"{path!r} has {info.st_nlink} names (hard links): hard-linked files "
                                      "are not read, they may point outside the folder")
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
