"""The clicks file of label.py as written: read with every row and column, its encoding, separator,
header, line ends and mode, and written back whole, so that a change keeps all it does not touch; a
stamp and a lock, so that a row another program wrote since is never written over."""
import contextlib
import csv
import io
import os
import tempfile

from support import clicks
from support.cli import DataError

try:
    import fcntl
except ImportError:  # Windows: no lock, and two label.py saving in the same instant may lose one click
    fcntl = None

COLUMNS = ["image", "x", "y", "class"]  # those a clicks file must have; a new one has these alone
# most rows the page opens: a million start in 8 to 16 s, hold about 0.7 GB and save a click in 0.1 to
# 0.2 s (docs/own-data.md); a larger file is refused in one line rather than let all three grow
ROWS = 1_000_000


def read_points(path, info):
    """The clicks file as written -> (column names in lower case, rows [(image name, x, y, [values as
    written])], how it is written: {"encoding", "sep", "header", "newline", "mode"}, its stamp), so that
    a change writes back every row and column it keeps. Read as train.py reads a CSV: Excel's files
    (UTF-8 with a byte-order mark, UTF-16, ';' or tab between values, 'Image' for 'image') are written
    back the same way."""
    seen = stamp(path)  # before reading: a change made while it is read is seen at the next save
    if seen is None or seen[1] == 0:
        umask = os.umask(0o22)  # reading it means setting it: put back at once
        os.umask(umask)
        return list(COLUMNS), [], {"encoding": "utf-8", "sep": ",", "header": COLUMNS, "newline": "\r\n",
                                   "mode": 0o666 & ~umask}, seen
    try:
        raw = path.read_bytes()
        encoding = clicks.encoding(raw)
        text = raw.decode(encoding)  # a byte-order mark is no part of 'image'
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
    if text.lstrip()[:1] in ("{", "["):
        raise DataError(f"{path}: GeoJSON, and the page reads and writes CSV (image,x,y,class): give "
                        "--labels a new .csv; train.py --point-labels takes both files")
    n = text.count("\n") - 1  # rows after the header (a line end in quotes counts too: near enough here)
    if n > ROWS:
        raise DataError(f"{path}: {n:,} rows, and the page opens {ROWS:,} at most: click into a new file "
                        "(train.py --point-labels takes several)")
    how = {"encoding": encoding, "sep": clicks.separator(text), "mode": path.stat().st_mode & 0o777,
           "newline": "\r\n" if text.split("\n", 1)[0].endswith("\r") else "\n"}
    lines = csv.reader(io.StringIO(text, newline=""), delimiter=how["sep"])
    how["header"] = next(lines, [])
    columns, find, rows = [c.strip().lower() for c in how["header"]], clicks.image_finder(info), []
    if not set(COLUMNS) <= set(columns):
        raise DataError(f"{path}: expected columns image,x,y,class (found {','.join(how['header'])})")
    i, j, k, named = columns.index("image"), columns.index("x"), columns.index("y"), {}
    for values in filter(None, lines):  # a blank line is no row
        whole = len(values) == len(columns)
        x, y = (number(values[j].strip()), number(values[k].strip())) if whole else (None, None)
        if x is None or y is None:
            raise DataError(f"{path}:{lines.line_num}: expected {len(columns)} values, x and y whole "
                            "numbers from 0")
        if values[i] not in named:  # an image as written -> its name: found once, for all its rows
            named[values[i]] = find(values[i], f"{path}:{lines.line_num}")
        name = named[values[i]]
        (w, h), _ = info[name]
        if not (x < w and y < h):
            raise DataError(f"{path}:{lines.line_num}: point ({x}, {y}) is outside {name} ({w}x{h})")
        rows.append((name, x, y, values))
    return columns, rows, how, seen


class Lines(list):
    """What csv.writer writes, one string a row: it writes each row in one call."""
    write = list.append


def as_written(rows, how):
    """Rows of values -> their lines of text, as the file writes them (separator, quotes, line ends)."""
    lines = Lines()
    csv.writer(lines, delimiter=how["sep"], lineterminator=how["newline"]).writerows(rows)
    return lines


def write_back(path, lines, how):
    """Write the clicks file whole, from its lines (the header first): a new temporary file beside it
    (made here, so that a link planted there is never followed), then a rename: the file is the old one
    or the new one, never half. -> the new file's stamp."""
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, how["mode"])
        with open(handle, "w", newline="", encoding=how["encoding"]) as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())  # a full disk may say so only here
            written = stamp(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return written


def stamp(file):
    """A file's (inode, size, modification time in ns), which a write by any program changes; None when
    there is no file. A path or an open file's number."""
    try:
        s = os.stat(file)
    except FileNotFoundError:
        return None
    return s.st_ino, s.st_size, s.st_mtime_ns


@contextlib.contextmanager
def held(path):
    """The folder of the clicks file locked from the check of its stamp to the rename of its new version:
    a second label.py on the file waits its turn. Nothing is left on disk; the lock ends with the process."""
    if not fcntl:
        yield
        return
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # and the lock with it


def number(text):
    """'12' -> 12; anything else ('-1', '1e3', '²', '') -> None."""
    return int(text) if text.isascii() and text.isdigit() else None
