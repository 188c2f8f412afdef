"""The file tools see the sandbox folder and nothing outside it."""
import os
import threading
import time

import pytest

from tools.files import MAX_READ_BYTES, FileSandbox, make_file_tools


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.txt").write_text("top secret")
    return secret


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "sandbox"
    (root / "docs").mkdir(parents=True)
    (root / "hello.txt").write_text("hello world\n")
    (root / "docs" / "readme.md").write_text("# Readme\n")
    return root


@pytest.fixture
def sandbox(root):
    return FileSandbox(root)


def test_list_root(sandbox):
    assert sandbox.list_files() == ["docs/", "hello.txt (12 bytes)"]


def test_list_subfolder_and_recursive(sandbox):
    assert sandbox.list_files("docs") == ["docs/readme.md (9 bytes)"]
    assert sandbox.list_files(".", recursive=True) == [
        "docs/", "hello.txt (12 bytes)", "docs/readme.md (9 bytes)"]


def test_read_text(sandbox):
    assert sandbox.read_file("hello.txt") == "hello world\n"
    assert sandbox.read_file("docs/readme.md") == "# Readme\n"
    assert sandbox.read_file("./docs//readme.md") == "# Readme\n"


@pytest.mark.parametrize("path", ["../outside/secret.txt", "docs/../../outside/secret.txt", "..",
                                  "docs/..", "..\\outside\\secret.txt"])
def test_dot_dot_is_refused(sandbox, path):
    with pytest.raises(PermissionError, match="'..' is not allowed"):
        sandbox.read_file(path)


@pytest.mark.parametrize("path", ["/etc/passwd", "/", "//etc/passwd", "C:\\Windows\\win.ini",
                                  "\\\\server\\share\\x"])
def test_absolute_paths_are_refused(sandbox, path):
    with pytest.raises(PermissionError, match="absolute paths are not allowed"):
        sandbox.read_file(path)
    with pytest.raises(PermissionError):
        sandbox.list_files(path)


def test_symlink_to_file_outside_is_refused(sandbox, root, outside):
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(PermissionError, match="outside the sandbox"):
        sandbox.read_file("leak.txt")
    assert "leak.txt (link outside the sandbox, not readable)" in sandbox.list_files()


def test_symlinked_dir_outside_is_refused(sandbox, root, outside):
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PermissionError, match="outside the sandbox"):
        sandbox.read_file("escape/secret.txt")
    with pytest.raises(PermissionError, match="outside the sandbox"):
        sandbox.list_files("escape")
    listing = sandbox.list_files(recursive=True)
    assert not any("secret" in entry for entry in listing)


def test_symlink_inside_the_sandbox_is_fine(sandbox, root):
    (root / "alias.txt").symlink_to(root / "hello.txt")
    assert sandbox.read_file("alias.txt") == "hello world\n"


def test_sandbox_root_itself_may_be_a_symlink(tmp_path, root):
    link = tmp_path / "link-to-sandbox"
    link.symlink_to(root, target_is_directory=True)
    assert FileSandbox(link).read_file("hello.txt") == "hello world\n"


def test_broken_and_looping_links(sandbox, root):
    (root / "broken").symlink_to(root / "nowhere")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("broken")
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("loop")
    listing = sandbox.list_files()
    assert "broken (broken link)" in listing and "loop (broken link)" in listing


def test_missing_file(sandbox):
    with pytest.raises(FileNotFoundError, match="no such file"):
        sandbox.read_file("nope.txt")


def test_folder_and_file_mixups(sandbox):
    with pytest.raises(IsADirectoryError, match="use list_files"):
        sandbox.read_file("docs")
    with pytest.raises(NotADirectoryError, match="use read_file"):
        sandbox.list_files("hello.txt")


def test_big_file_is_truncated_with_a_note(sandbox, root):
    (root / "big.txt").write_text("a" * (MAX_READ_BYTES * 3))
    text = sandbox.read_file("big.txt")
    assert text.startswith("a" * MAX_READ_BYTES)
    assert text.endswith(f"[truncated: showed the first {MAX_READ_BYTES} of {MAX_READ_BYTES * 3} bytes]")


def test_max_bytes_is_bounded(sandbox):
    assert sandbox.read_file("hello.txt", max_bytes=5).startswith("hello\n[truncated")
    for bad in (0, -1, MAX_READ_BYTES + 1, 10**12, True):
        with pytest.raises(ValueError, match="max_bytes"):
            sandbox.read_file("hello.txt", max_bytes=bad)


def test_truncation_never_splits_a_character(sandbox, root):
    (root / "accents.txt").write_text("é" * 10, encoding="utf-8")  # 2 bytes each
    assert sandbox.read_file("accents.txt", max_bytes=5).startswith("éé\n[truncated")


def test_binary_files_are_refused(sandbox, root):
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match="binary"):
        sandbox.read_file("image.png")


def test_non_utf8_text_is_refused(sandbox, root):
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        sandbox.read_file("latin1.txt")


def test_bom_is_dropped_and_empty_file_is_said_so(sandbox, root):
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbfhi")
    (root / "empty.txt").write_bytes(b"")
    assert sandbox.read_file("bom.txt") == "hi"
    assert sandbox.read_file("empty.txt") == "[the file is empty]"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_hanging(sandbox, root):
    os.mkfifo(root / "pipe")
    with pytest.raises(PermissionError, match="not a regular file"):
        sandbox.read_file("pipe")
    assert "pipe (special file, not readable)" in sandbox.list_files()


def test_bad_path_values(sandbox):
    with pytest.raises(ValueError, match="NUL"):
        sandbox.read_file("hello.txt\0.png")
    with pytest.raises(ValueError, match="string"):
        sandbox.read_file(None)


def test_listing_is_capped(sandbox, root):
    many = root / "many"
    many.mkdir()
    for n in range(600):
        (many / f"f{n:03d}.txt").write_text("x")
    listing = sandbox.list_files("many")
    assert len(listing) == 501
    assert listing[-1].startswith("... more entries not shown")


def test_root_must_be_an_existing_folder(tmp_path):
    with pytest.raises(NotADirectoryError):
        FileSandbox(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        FileSandbox(tmp_path / "file")


def test_factory_gives_named_plain_functions(root):
    list_files, read_file = make_file_tools(root)
    assert (list_files.__name__, read_file.__name__) == ("list_files", "read_file")
    assert read_file("hello.txt") == "hello world\n"


# --- links and races: nothing outside the sandbox is ever read or listed -----------------

SWAP_SECONDS = 2.0
MAX_SWAPS = 200_000


def _swap_folder_for_symlink_until(stop, sub, outside):
    """Keep replacing folder `sub` by a symlink to `outside` and back (about 2 s at most)."""
    parked = sub.with_name(sub.name + "-parked")
    deadline = time.monotonic() + SWAP_SECONDS
    swaps = 0
    while not stop.is_set() and time.monotonic() < deadline and swaps < MAX_SWAPS:
        os.rename(sub, parked)
        os.symlink(outside, sub, target_is_directory=True)
        time.sleep(0)  # let the reader run while the link is there...
        os.unlink(sub)
        os.rename(parked, sub)
        time.sleep(0)  # ...and while the folder is
        swaps += 1


def _race(sandbox_call, sub, outside):
    """Run sandbox_call in a loop while another thread swaps `sub`; return its results."""
    stop = threading.Event()
    swapper = threading.Thread(target=_swap_folder_for_symlink_until, args=(stop, sub, outside))
    results, refused = [], 0
    swapper.start()
    try:
        while swapper.is_alive():
            try:
                results.append(sandbox_call())
            except (PermissionError, FileNotFoundError, NotADirectoryError):
                refused += 1  # caught mid-swap: refusing is fine, reading outside is not
    finally:
        stop.set()
        swapper.join()
    return results, refused


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_swapping_a_folder_for_a_symlink_while_reading_never_reads_outside(sandbox, root, outside):
    (root / "sub").mkdir()
    (root / "sub" / "secret.txt").write_text("inside")
    results, refused = _race(lambda: sandbox.read_file("sub/secret.txt"), root / "sub", outside)
    assert results, "the race never let a read through; the test proves nothing"
    leaked = [text for text in results if text != "inside"]
    assert not leaked, f"{len(leaked)} of {len(results) + refused} reads returned another file"


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_swapping_a_folder_for_a_symlink_while_listing_never_lists_outside(sandbox, root, outside):
    (root / "sub").mkdir()
    (root / "sub" / "inside.txt").write_text("inside")
    (outside / "only-outside.txt").write_text("x")
    results, _ = _race(lambda: sandbox.list_files("sub", recursive=True), root / "sub", outside)
    assert results
    leaked = [listing for listing in results if any("outside" in entry for entry in listing)]
    assert not leaked, f"{len(leaked)} listings showed the outside folder: {leaked[0]}"


@pytest.mark.skipif(not hasattr(os, "link"), reason="needs hard links")
def test_hard_link_to_a_file_outside_is_refused(sandbox, root, outside):
    os.link(outside / "secret.txt", root / "hard.txt")
    (root / "docs" / "deep").mkdir()
    os.link(outside / "secret.txt", root / "docs" / "deep" / "hard.txt")
    for path in ("hard.txt", "docs/deep/hard.txt"):
        with pytest.raises(PermissionError, match="hard-linked files are not read, they may point "
                                                  "outside the folder"):
            sandbox.read_file(path)
    listing = sandbox.list_files(recursive=True)
    assert "hard.txt (hard-linked file, not readable)" in listing
    assert not any("10 bytes" in entry for entry in listing)  # not even the secret's size


def test_symlinks_to_outside_are_refused_however_spelled(sandbox, root, outside):
    (root / "relative-leak.txt").symlink_to(os.path.join("..", "outside", "secret.txt"))
    (root / "docs" / "nested-leak.txt").symlink_to(outside / "secret.txt")
    (root / "docs" / "up").symlink_to("..", target_is_directory=True)  # the root itself: fine
    (root / "docs" / "upup").symlink_to(os.path.join("..", ".."), target_is_directory=True)
    (root / "hop.txt").symlink_to(root / "docs" / "nested-leak.txt")  # inside, then outside
    for path in ("relative-leak.txt", "docs/nested-leak.txt", "docs/upup/outside/secret.txt",
                 "docs/up/docs/up/relative-leak.txt", "hop.txt"):
        with pytest.raises(PermissionError, match="outside the sandbox"):
            sandbox.read_file(path)
    with pytest.raises(PermissionError, match="outside the sandbox"):
        sandbox.list_files("docs/upup")
    listing = sandbox.list_files("docs")
    assert "docs/nested-leak.txt (link outside the sandbox, not readable)" in listing
    assert "docs/upup (link outside the sandbox, not readable)" in listing
    assert not any("secret" in entry for entry in sandbox.list_files(recursive=True))


def test_links_that_stay_inside_still_work(sandbox, root):
    (root / "docs" / "back.txt").symlink_to(os.path.join("..", "hello.txt"))
    (root / "manual").symlink_to("docs", target_is_directory=True)
    (root / "docs" / "up").symlink_to("..", target_is_directory=True)
    assert sandbox.read_file("docs/back.txt") == "hello world\n"
    assert sandbox.read_file("manual/readme.md") == "# Readme\n"
    assert sandbox.read_file("docs/up/docs/up/hello.txt") == "hello world\n"
    assert sandbox.list_files("manual") == sandbox.list_files("docs")  # shown by their real paths
    assert "manual/" in sandbox.list_files()
    assert "docs/back.txt (12 bytes)" in sandbox.list_files("docs")
    with pytest.raises(IsADirectoryError, match="use list_files"):
        sandbox.read_file("docs/up")


def test_a_file_used_as_a_folder_is_not_found(sandbox):
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("hello.txt/more")
    with pytest.raises(FileNotFoundError):
        sandbox.list_files("hello.txt/more")
