"""A page to click points and draw strokes on your images: the labels train.py --point-labels reads,
saved at once; with a checkpoint, the model's map over the image and where it suggests clicking next.

    python label.py DIR --labels clicks.csv [--classes Water,Land,Road] [--ckpt runs/x/ckpt.pt] [--port 8000]

The page is support/label.html with its script, label.js; support/label_server.py answers its requests.
The server gives it the images of DIR (large ones downsampled), the clicks, and writes the clicks file
whole after each change: a temporary file, then a rename; a file changed on disk since it was read is read
again first. A stroke is consecutive rows sharing a number in a 'stroke' column. A clicks file with a
'sample' column (assess.py's) opens in blind mode: its points one by one, never the map, no stroke.
"""
import argparse
import csv
import io
import itertools
import json
import secrets
import sys
import threading
from collections import namedtuple
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import predict
from model import load_checkpoint
from support import label_file, label_server, layout, maps, rasters
from support.bands import display, input_plan, model_input
from support.cli import DataError, band_list, check_writable, command_line
from support.label_file import as_written, number, read_points, write_back
from support.speed import fold_batch_norm, fold_upsampling, pick_dtype

SHOWN = 2048  # longest side of an image as the page shows it; clicks still land on full-image pixels
VERTICES = 10_000  # most vertices of one stroke: 20,000 image pixels long at one every 2 pixels
# a row of the clicks file: image name, x, y, class name ('' for none yet), stroke and sample numbers (or
# None), and its text as written, so that a save writes the rows it keeps without making them again
Row = namedtuple("Row", "image x y cls stroke sample line")


class Labels:
    """The images of a folder, the classes, the rows of the clicks file (in memory as on disk) and, with
    a checkpoint, the model. A lock: two tabs saving at once write the file one after the other; and the
    folder's lock (label_file.held): two label.py on one file too."""

    def __init__(self, root, file, classes, ckpt, suggest, show=None):
        self.root, self.file, self.suggest = Path(root), Path(file), suggest
        self.files = []
        for name, path, _ in layout.find_images(root):
            if utf8(name):
                self.files.append((name, path))
            else:  # its clicks could not be written: a clicks file is UTF-8 text
                print(f"left out: {str(path)!r}: its name is not UTF-8: rename it to label it")
        if not self.files:
            raise DataError(f"{root}: no image whose name is UTF-8")
        self.path = dict(self.files)
        self.info = {n: rasters.image_info(p) for n, p in self.files}
        read = read_points(self.file, self.info)
        self.blind = "sample" in read[0]
        if self.blind and not read[1]:
            raise DataError(f"{self.file}: a 'sample' column (blind labelling) but no point")
        written = {r[3][read[0].index("class")] for r in read[1]}
        self.names, self.colours, self.new = read_classes(classes, self.root, self.file, written)
        self.known = {n: n for n in ["", *self.names]}  # each class one string, shared by its rows
        self.version = 0  # of the clicks in memory: one more at each change, and each reading of the file
        self.load(read)  # every class one of these, every sample a number, every stroke whole, or one line
        self.lock, self.model_lock, self.picture, self.maps = threading.Lock(), threading.Lock(), None, {}
        self.model, self.meta, self.show = None, None, show
        if ckpt and self.blind:
            print(f"--ckpt {ckpt} ignored: {self.file} has a 'sample' column (blind labelling: the person "
                  "must not see what the map says)")
        elif ckpt:
            model, meta = load_checkpoint(ckpt)
            if meta["classes"] != self.names:
                raise DataError(f"--ckpt {ckpt}: its classes ({', '.join(meta['classes'])}) are not these")
            self.model, self.meta = fold_upsampling(fold_batch_norm(model)), meta
            self.show = show or meta.get("show_bands")  # the bands the run showed, unless others are asked
            # the precision it trained in: the page shows what predict.py --precision of that maps
            self.dtype = pick_dtype(meta.get("precision", "auto"), torch.device("cpu"), model, train=False)

    def load(self, read=None):
        """The clicks file (read again, unless given as read_points returns it) -> memory: rows [Row] in the
        file's order (a removed one None, so that the others keep their place; a new one at the end), and
        where they are: points {(image, x, y): [row places]}, strokes {stroke number: [row places]}. One
        line for a row that is not right: a class not one of these, a sample not a number, a stroke's rows
        apart."""
        columns, rows, how, seen = read or read_points(self.file, self.info)
        if ("sample" in columns) != self.blind:
            raise DataError(f"{self.file}: its 'sample' column came or went: start label.py again")
        c, s, b = (columns.index(k) if k in columns else None for k in ("class", "stroke", "sample"))
        kept, points, strokes, last = [], {}, {}, None  # last: the row before's stroke, None after a point
        for k, line in enumerate(as_written([r[3] for r in rows], how)):
            (name, x, y, values), rows[k] = rows[k], None  # values freed as it goes: a million rows' add up
            where, key = f"{self.file}: {name} ({x}, {y})", values[s].strip() if s is not None else ""
            cls, stroke = self.class_name(values[c], where), number(key) if key else None
            if key and (stroke is None or not cls):
                raise DataError(f"{where}: stroke {key!r}: a stroke is a whole number from 0, with a class")
            if key and stroke in strokes and last != (stroke, name, cls):
                raise DataError(f"{where}: stroke {stroke} again: its rows are consecutive, one image, one "
                                "class")
            sample = number(values[b].strip()) if self.blind else None
            if self.blind and (sample is None or key):
                raise DataError(f"{where}: sample {values[b]!r}: blind labelling takes points, each with its "
                                "number in the sample")
            kept.append(Row(name, x, y, cls, stroke, sample, line))
            (strokes.setdefault(stroke, []) if key else points.setdefault((name, x, y), [])).append(k)
            last = (stroke, name, cls) if key else None
        self.columns, self.how, self.seen, self.version = columns, how, seen, self.version + 1
        self.rows, self.points, self.strokes = kept, points, strokes

    def class_name(self, written, where):
        """A class as written -> its name ('' for none yet; an index names its class), or one line."""
        value = written.strip()
        if value.isdigit() and value not in self.names and int(value) < len(self.names):
            value = self.names[int(value)]
        if value not in self.known:
            raise DataError(f"{where}: class {value!r} is not one of {', '.join(self.names)}")
        return self.known[value]

    def point(self, row):
        """A point as the page shows it: image, x, y, class ('' when not given yet), and in blind mode its
        number in the sample."""
        return {"image": row.image, "x": row.x, "y": row.y, "class": row.cls} | \
            ({"sample": row.sample} if self.blind else {})

    def stroke(self, s):
        """Stroke number s as the page shows it: image, stroke, class, points [[x, y], ...]."""
        rows = [self.rows[k] for k in self.strokes[s]]
        return {"image": rows[0].image, "stroke": s, "class": rows[0].cls,
                "points": [[r.x, r.y] for r in rows]}

    def clicks(self):
        """Every point the page shows."""
        return [self.point(r) for r in self.rows if r and r.stroke is None]

    def change(self, body):
        """A point: {"image", "x", "y", "class"} gives the points at (x, y) that class, or adds one; without
        "class" it removes them. A stroke: {"image", "stroke": [[x, y], ...], "class"} adds one, {"image",
        "stroke": number} removes it. Every other row and column stays as written, and so does a row that
        another label.py or a person wrote since the file was read: it is read again first. -> what was
        saved: the points at (x, y) ({"clicks"}), the stroke added ({"strokes"}), and the version of the
        clicks it makes; or all of them ({"state"}) when the page's "version" is not the one changed (another
        tab saved since, or the file was read again)."""
        name = body["image"]
        if name not in self.info:
            raise ValueError("image must be one of the folder's")
        if "class" in body and body["class"] not in self.names:
            raise ValueError(f"class {body['class']!r} is not one of {', '.join(self.names)}")
        self.info[name] = rasters.image_info(self.path[name])  # as it is now: re-exported smaller, say
        with self.lock, label_file.held(self.file):
            if label_file.stamp(self.file) != self.seen:  # written since it was read: the rows are kept,
                self.load()  # and this change is made to them
            stale = body.get("version") != self.version
            saved = self.stroke_change(body) if "stroke" in body else self.point_change(body)  # or ValueError
            header = as_written([self.how["header"] + self.columns[len(self.how["header"]):]], self.how)
            lines = itertools.chain(header, (r.line for r in self.rows if r))
            try:
                self.seen = write_back(self.file, lines, self.how)
            except BaseException:  # not saved (a full disk): memory is the file again, which is as it was
                self.load()
                raise
            self.version += 1
            return {"state": self.state()} if stale else saved | {"version": self.version}

    def point_change(self, body):
        at = (body["image"], *self.pixel(body["image"], [body["x"], body["y"]]))
        here = self.points.get(at, [])  # points only: a stroke's vertex there stays
        if self.blind and not (here and "class" in body):  # a probability sample: its points, no other
            raise ValueError("blind mode: only the sample's points take a class, and each stays")
        if "class" not in body:
            for k in self.points.pop(at, []):
                self.rows[k] = None
            return {"clicks": []}
        c, cls = self.columns.index("class"), self.known[body["class"]]
        for k in here:  # the point's rows take the class; their other values stay as written
            values = next(csv.reader([self.rows[k].line], delimiter=self.how["sep"]))
            values[c] = cls
            self.rows[k] = self.rows[k]._replace(cls=cls, line=as_written([values], self.how)[0])
        if not here:
            self.add([(*at, cls)])
        return {"clicks": [self.point(self.rows[k]) for k in self.points[at]]}

    def stroke_change(self, body):
        name, given = body["image"], body["stroke"]  # its vertices to add, or its number to remove
        if self.blind:
            raise ValueError("blind mode: a sample is points, never a stroke")
        if "class" not in body:  # removes the stroke of that number on this image (none: nothing to remove)
            if type(given) is not int:
                raise ValueError("a stroke to remove is its number")
            if given in self.strokes and self.rows[self.strokes[given][0]].image == name:
                for k in self.strokes.pop(given):
                    self.rows[k] = None
            return {"strokes": []}
        if type(given) is not list or not 0 < len(given) <= VERTICES:
            raise ValueError(f"a stroke is a list of 1 to {VERTICES} [x, y] vertices")
        vertices = [self.pixel(name, xy) for xy in given]
        if "stroke" not in self.columns:  # added at the first stroke: every row has it, empty
            self.columns.append("stroke")
            end, sep = self.how["newline"], self.how["sep"]
            self.rows = [r and r._replace(line=r.line[: -len(end)] + sep + end) for r in self.rows]
        s = 1 + max(self.strokes, default=0)
        self.add([(name, x, y, self.known[body["class"]]) for x, y in vertices], s)
        return {"strokes": [self.stroke(s)]}

    def add(self, rows, stroke=None):
        """New rows (image, x, y, class) at the end of the file: a point each, or stroke number `stroke`."""
        key = "" if stroke is None else str(stroke)
        new = [{"image": n, "x": str(x), "y": str(y), "class": c, "stroke": key} for n, x, y, c in rows]
        lines = as_written([[r.get(k, "") for k in self.columns] for r in new], self.how)
        for (name, x, y, cls), line in zip(rows, lines):
            k = len(self.rows)
            self.rows.append(Row(name, x, y, cls, stroke, None, line))
            (self.points.setdefault((name, x, y), []) if stroke is None else
             self.strokes.setdefault(stroke, [])).append(k)

    def pixel(self, name, xy):
        """[x, y] -> (x, y), whole numbers on the image, or a ValueError."""
        (w, h), _ = self.info[name]
        if type(xy) is not list or len(xy) != 2 or any(type(v) is not int for v in xy):
            raise ValueError(f"{str(xy)[:20]}: x and y are whole numbers")
        if not (0 <= xy[0] < w and 0 <= xy[1] < h):
            raise ValueError(f"({xy[0]}, {xy[1]}) is outside {name} ({w}x{h})")
        return tuple(xy)

    def shown(self, i):
        """Image i as the page shows it: JPEG bytes, its longest side at most SHOWN."""
        if self.picture is None or self.picture[0] != i:
            s = rasters.read_scene(self.files[i][1])
            picture = Image.fromarray(display(s["samples"], s["valid"], self.show))
            picture.thumbnail((SHOWN, SHOWN))
            self.picture = (i, encoded(picture, "JPEG"))  # one image at a time: scenes can be large
        return self.picture[1]

    def mapped(self, i):
        """The model's map of image i (PNG bytes, as the page shows it) and its suggested next clicks: made
        once per image (the page asks for both at once), and kept."""
        with self.model_lock:  # one map at a time: each takes every core
            if i not in self.maps:
                s = rasters.read_scene(self.files[i][1])
                plan = input_plan(s["samples"].shape[2], s["samples"].dtype, self.meta)
                image = model_input(s["samples"], s["valid"], plan)
                logits_of = partial(predict.sliding_window, self.model, dtype=self.dtype, norm=plan[1])
                pred, margin = maps.map_in_blocks(logits_of, image, margin=True)
                if s["valid"] is not None:
                    margin[~s["valid"]] = np.inf
                picture = maps.colourize(pred, self.colours)
                picture.thumbnail((SHOWN, SHOWN), Image.NEAREST)
                near = predict.suggest_clicks(predict.least_sure(margin), self.suggest)
                hints = [{"x": x, "y": y, "hint": self.names[pred[y, x]]} for x, y in near]
                self.maps[i] = (encoded(picture, "PNG"), hints)  # small: every image's is kept
        return self.maps[i]

    def state(self):
        colours = ["#%02X%02X%02X" % tuple(c) for c in self.colours]
        return {"images": [{"name": n, "width": self.info[n][0][0], "height": self.info[n][0][1]}
                           for n, _ in self.files],
                "classes": [{"name": n, "colour": c} for n, c in zip(self.names, colours)],
                "clicks": self.clicks(), "strokes": [self.stroke(s) for s in self.strokes],
                "vertices": VERTICES, "model": self.model is not None, "blind": self.blind,
                "version": self.version}


def encoded(picture, kind):
    buffer = io.BytesIO()
    picture.save(buffer, kind)
    return buffer.getvalue()


def utf8(name):
    """Whether a file name is UTF-8 (one that is not holds escapes, os.fsdecode's way, which none encodes)."""
    return name == name.encode(errors="replace").decode()


def read_classes(given, root, file, written):
    """--classes as a classes.json or as names 'Water,Land,...' (keys 1, 2, ... in that order); else
    classes.json beside the clicks file, else ROOT/classes.json, else the classes written in the clicks
    file, sorted as train.py sorts them -> (names, colours, where to save them: beside the clicks file, when
    --classes names them and no classes.json is there, so that the next label.py and train.py need none)."""
    if given and given.endswith(".json"):
        if not Path(given).is_file():
            raise DataError(f"--classes {given}: no such file (a classes.json, or names: Water,Land,...)")
        return (*layout.read_classes(given), None)
    beside = file.parent / "classes.json"
    where = beside if beside.exists() else root / "classes.json"
    found = layout.read_classes(where, required=False)
    if given:
        names = list(dict.fromkeys(n.strip() for n in given.split(",") if n.strip()))  # as given, once each
        if not names:
            raise DataError(f"--classes {given!r}: no class name (a classes.json, or names: Water,Land,...)")
        if found and found[0] != names:
            raise DataError(f"--classes {given}: {where} names others ({', '.join(found[0])}): leave "
                            "--classes out, or edit or remove that file")
        return (*found, None) if found else (names, layout.default_colours(names), beside)
    names = sorted({w.strip() for w in written} - {""})
    if found is None and not names:
        raise DataError(f"{root}: no classes.json and no clicks yet: give --classes Water,Land,Road,...")
    return (*found, None) if found else (names, layout.default_colours(names), None)


def serve(args):
    """-> the server, listening (not yet serving): main() runs it, tests start it in a thread."""
    if args.suggest < 0:
        raise DataError(f"--suggest {args.suggest}: a number of clicks per image, 0 or more")
    show = band_list(args.show_bands, "--show-bands", counts=(1, 3)) if args.show_bands else None
    file = Path(args.labels)
    if file.is_symlink():  # a clicks file kept elsewhere: the clicks go there, the link stays a link
        file = file.resolve()
        print(f"--labels {args.labels}: a link; the clicks are written to the file it links to, {file}")
    labels = Labels(args.dir, file, args.classes, args.ckpt, args.suggest, show)
    check_writable(file.parent, "--labels")
    try:
        server = ThreadingHTTPServer((args.host, args.port), label_server.Handler)
    except (OSError, OverflowError) as e:  # in use, no such address, a port past 65535
        raise DataError(f"--host {args.host} --port {args.port}: cannot listen there ({e})")
    file.parent.mkdir(parents=True, exist_ok=True)  # every input checked
    if labels.new:  # --classes named them: kept beside the clicks, for the next label.py and train.py
        classes = [{"title": n, "color": "#%02X%02X%02X" % tuple(c)}
                   for n, c in zip(labels.names, labels.colours)]
        with open(labels.new, "x") as f:  # "x": never over a file, nor through a link planted there
            json.dump({"classes": classes}, f, indent=1)
        print(f"classes {', '.join(labels.names)} (keys 1 to {len(labels.names)}) -> {labels.new}")
    server.labels = labels
    if not label_server.listen_on(server, args.host, secrets.token_urlsafe()):  # a new token each start
        print(f"warning: --host {args.host}: anyone who can reach port {server.server_address[1]} can read "
              "the images and, with the token, write clicks")
    server.handle_error = lambda request, address: print(f"error: {sys.exc_info()[1]!r}", file=sys.stderr)
    return server


def get_args(argv=None):
    p = argparse.ArgumentParser(description="A page to click points and draw strokes on your images for "
                                "train.py.")
    p.add_argument("dir", help="the folder of images (as train.py --data reads it)")
    p.add_argument("--point-labels", "--labels", "--points", dest="labels", required=True, metavar="FILE",
                   help="the clicks file, as train.py --point-labels reads it (CSV image,x,y,class[,stroke,"
                   "...]): read at start, written back whole at each change; with a 'sample' column, blind "
                   "labelling")
    p.add_argument("--classes", help="a classes.json, or class names in key order: Water,Land,Road (then "
                   "saved as classes.json beside the clicks file; default: classes.json there, else "
                   "DIR/classes.json, else the classes of the clicks file, sorted)")
    p.add_argument("--ckpt", help="a checkpoint of train.py: its map (key m) and where to click next")
    p.add_argument("--suggest", type=int, default=10, help="suggested clicks per image, with --ckpt "
                   "(default: %(default)s)")
    p.add_argument("--show-bands", default="", help="the bands shown as red,green,blue, e.g. 4,3,2 for false "
                   "colour (default: the checkpoint's, else 1,2,3)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                   "machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 picks a free one)")
    return p.parse_args(argv)


def main(argv=None):
    server = serve(get_args(argv))
    host, port = server.server_address[:2]
    host = "127.0.0.1" if server.everywhere else host  # browsers refuse 0.0.0.0 as an address to open
    print(f"labelling {len(server.labels.files)} images of {server.labels.root}: open "
          f"http://{host}:{port}/#token={server.token} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(command_line(main))
