"""The clicks file of label.py as written: read with every row and column, its encoding, separator,
header, line ends and mode, and written back whole, so that a change keeps all it does not touch."""
import csv
import io
import os
import tempfile

from support import clicks
from support.cli import DataError

COLUMNS = ["image", "x", "y", "class"]  # those a clicks file must have; a new one has these alone


def read_points(path, info):
    """The clicks file as written -> (column names in lower case, rows [(image name, x, y, [values as
    written])], how it is written: {"encoding", "sep", "header", "newline", "mode"}), so that a change
    writes back every row and column it keeps. Read as train.py reads a CSV: Excel's files (UTF-8 with
    a byte-order mark, UTF-16, ';' or tab between values, 'Image' for 'image') are written back the
    same way."""
    if not path.exists() or path.stat().st_size == 0:
        umask = os.umask(0o22)  # reading it means setting it: put back at once
        os.umask(umask)
        return list(COLUMNS), [], {"encoding": "utf-8", "sep": ",", "header": COLUMNS, "newline": "\r\n",
                             "mode": 0o666 & ~umask}
    try:
        raw = path.read_bytes()
        encoding = clicks.encoding(raw)
        text = raw.decode(encoding)  # a byte-order mark is no part of 'image'
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
    if text.lstrip()[:1] in ("{", "["):
        raise DataError(f"{path}: GeoJSON, and the page reads and writes CSV (image,x,y,class): give "
                        "--points a new .csv; train.py --point-labels takes both files")
    how = {"encoding": encoding, "sep": clicks.separator(text), "mode": path.stat().st_mode & 0o777,
           "newline": "\r\n" if text.split("\n", 1)[0].endswith("\r") else "\n"}
    lines = csv.reader(io.StringIO(text, newline=""), delimiter=how["sep"])
    how["header"] = next(lines, [])
    columns, find, rows = [c.strip().lower() for c in how["header"]], clicks.image_finder(info), []
    if not set(COLUMNS) <= set(columns):
        raise DataError(f"{path}: expected columns image,x,y,class (found {','.join(how['header'])})")
    for values in filter(None, lines):  # a blank line is no row
        where, record = f"{path}:{lines.line_num}", dict(zip(columns, values))
        x, y = number(record["x"].strip()), number(record["y"].strip())
        if len(values) != len(columns) or x is None or y is None:
            raise DataError(f"{where}: expected {len(columns)} values, x and y whole numbers from 0")
        name = find(record["image"], where)
        (w, h), _ = info[name]
        if not (x < w and y < h):
            raise DataError(f"{where}: point ({x}, {y}) is outside {name} ({w}x{h})")
        rows.append((name, x, y, values))
    return columns, rows, how


def write_back(path, columns, rows, how):
    """Write the clicks file whole: a new temporary file beside it (made here, so that a link planted
    there is never followed), then a rename: the file is the old one or the new one, never half."""
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, how["mode"])
        with open(handle, "w", newline="", encoding=how["encoding"]) as f:
            written = csv.writer(f, delimiter=how["sep"], lineterminator=how["newline"])
            header = how["header"] + columns[len(how["header"]):]  # as written, and any column added
            written.writerows([header, *(r[3] for r in rows)])
            f.flush()
            os.fsync(f.fileno())  # a full disk may say so only here
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def number(text):
    """'12' -> 12; anything else ('-1', '1e3', '²', '') -> None."""
    return int(text) if text.isascii() and text.isdigit() else None
