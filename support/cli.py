"""Command-line plumbing the scripts share: bad input as one line and exit code 2, an output folder
tried for writing before any long work, files written whole or not at all, comma lists read from flags."""
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


class DataError(Exception):
    """A problem with the user's data or arguments: reported in one line, never a traceback."""


class WriteError(DataError):
    """An output that cannot be written (a full disk, say): one line, and the command stops there."""


def command_line(main, argv=None):
    """Run a script's main(argv) as a command -> exit code: what main returns if it is a number,
    else 0; 2 with one line on stderr for bad input (a DataError); 130 for Ctrl-C."""
    try:
        code = main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def check_writable(folder, flag, keep=False):
    """Write a file in `folder` (made with its parents for the try, and removed again if it was made,
    unless `keep`), so that an output folder that cannot be used is one line naming it, before any long
    work, and an input refused later leaves nothing behind. The writers make the folder when they write.
    Processes that check one folder at once keep it: one's removal would fail another's try."""
    folder = Path(folder)
    made = [] if keep else [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"{flag} {folder}: cannot be written there ({e.strerror})")
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass


@contextmanager
def written(path):
    """with written(path) as tmp: write the file `tmp` (any library, by name); at the end of the block it
    is renamed to `path`, so that `path` holds the old file or the whole new one, never part of one,
    whatever stops the writing (a full disk, a kill). `tmp` is new, beside `path`, made exclusively with
    a name no other process uses; a link where the output goes is refused, never written through. A
    write that fails is one line naming the file and the free space."""
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"{path}: is a link; an output is never written through one (remove the link)")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to open()
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        free = shutil.disk_usage(path.parent).free / 1e6 if path.parent.is_dir() else 0
        raise WriteError(f"{path}: cannot be written ({e.strerror or e}; {free:,.0f} MB free there)")
    finally:
        tmp.unlink(missing_ok=True)


def tile_list(text, default):
    """'1,2,5' -> [1, 2, 5]; an empty text gives `default`."""
    try:
        return [int(t) for t in text.split(",") if t.strip()] or default
    except ValueError:
        raise DataError(f"tiles {text!r}: expected tile numbers separated by commas, e.g. 1,2,3")


def band_list(text, flag="--bands", counts=None):
    """'4,3,2' -> [4, 3, 2]: bands counted from 1, each once; `counts`: how many there may be (the
    bands shown as red, green, blue: 1 or 3), else any number."""
    try:
        bands = [int(b) for b in text.split(",")]
    except ValueError:
        bands = []
    if not bands or min(bands) < 1 or len(set(bands)) < len(bands) or (counts and len(bands) not in counts):
        many = " or ".join(map(str, counts)) if counts else "one or more different"
        raise DataError(f"{flag} {text}: expected {many} band numbers from 1, separated by commas, "
                        "e.g. 4,3,2")
    return bands
