"""A page to click points and draw strokes on your images: the labels train.py --point-labels reads,
saved at once; with a checkpoint, the model's map over the image and where it suggests clicking next.

    python label.py DIR --points clicks.csv [--classes classes.json] [--ckpt runs/x/ckpt.pt] [--port 8000]

The page is label.html with its script, label.js. This server gives it the images of DIR (large ones
downsampled), the clicks, and writes the clicks file whole after each change: a temporary file, then a
rename. A stroke is consecutive rows sharing a number in a 'stroke' column. A clicks file with a 'sample'
column (assess.py's) opens in blind mode: its points one by one, never the map, no stroke.
"""
import argparse
import errno
import io
import json
import secrets
import sys
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import predict
from model import load_checkpoint
from support import label_guard, layout, maps, scene
from support.bands import display, model_input
from support.cli import DataError, band_list, check_writable, command_line
from support.label_file import number, read_points, write_back
from support.speed import fold_batch_norm, fold_upsampling, pick_dtype

PAGE = Path(__file__).parent / "support" / "label.html"
SCRIPT = PAGE.with_suffix(".js")  # the page's script, a file of its own: the policy below runs no inline one
# what the page may do (Content-Security-Policy): run this server's script and nothing else (no inline
# script or handler, so a name that reached the page as HTML would run nothing), talk to this server only,
# and never show inside another site's page
POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
          "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SHOWN = 2048  # longest side of an image as the page shows it; clicks still land on full-image pixels
VERTICES = 10_000  # most vertices of one stroke: 20,000 image pixels long at one every 2 pixels


class Labels:
    """The images of a folder, the classes, the rows of the clicks file (in memory as on disk) and, with
    a checkpoint, the model. A lock: two tabs saving at once write the file one after the other."""

    def __init__(self, root, points, classes, ckpt, suggest, show=None):
        self.root, self.points, self.suggest = Path(root), Path(points), suggest
        self.files = [(n, p) for n, p, _ in layout.find_images(root)]
        self.info = {n: scene.image_info(p) for n, p in self.files}
        self.columns, self.rows, self.how = read_points(self.points, self.info)
        self.blind = "sample" in self.columns
        if self.blind and not self.rows:
            raise DataError(f"{self.points}: a 'sample' column (blind labelling) but no point")
        self.names, self.colours = read_classes(classes, self.root, {r[3][self.columns.index("class")]
                                                                     for r in self.rows})
        self.clicks()  # every class one of these, every sample a number, or one line saying which is not
        if self.strokes() and self.blind:  # every stroke whole, or one line saying which is not
            raise DataError(f"{self.points}: a 'sample' column (blind labelling) and strokes: a sample is "
                            "points only")
        self.lock, self.model_lock, self.cache = threading.Lock(), threading.Lock(), {}
        self.model, self.meta, self.show = None, None, show
        if ckpt and self.blind:
            print(f"--ckpt {ckpt} ignored: {self.points} has a 'sample' column (blind labelling: the person "
                  "must not see what the map says)")
        elif ckpt:
            model, meta = load_checkpoint(ckpt)
            if meta["classes"] != self.names:
                raise DataError(f"--ckpt {ckpt}: its classes ({', '.join(meta['classes'])}) are not these")
            self.model, self.meta = fold_upsampling(fold_batch_norm(model)), meta
            self.show = show or meta.get("show_bands")  # the bands the run showed, unless others are asked
            # the precision it trained in: the page shows what predict.py --precision of that maps
            self.dtype = pick_dtype(meta.get("precision", "auto"), torch.device("cpu"), model, train=False)

    def clicks(self, image=None):
        """The points the page shows (all, or one image's): image, x, y, class ('' when not given yet; an
        index names its class), and in blind mode the point's number in the sample."""
        shown = []
        for name, x, y, values in self.rows:
            row, where = dict(zip(self.columns, values)), f"{self.points}: {name} ({x}, {y})"
            value = self.class_name(row["class"], where)
            if row.get("stroke", "").strip():  # a stroke's vertex: strokes() shows it
                continue
            sample = number(row["sample"].strip()) if self.blind else None
            if self.blind and sample is None:
                raise DataError(f"{where}: sample {row['sample']!r} is not a point's number")
            if image in (None, name):
                shown.append({"image": name, "x": x, "y": y, "class": value} |
                             ({"sample": sample} if self.blind else {}))
        return shown

    def strokes(self, image=None):
        """The strokes the page shows (all, or one image's): image, stroke (its number), class, points
        [[x, y], ...]. A stroke is consecutive rows with one number in the 'stroke' column, one image and
        one class."""
        shown, done, last = [], set(), {}  # last: the stroke of the row before, {} after a point
        for name, x, y, values in self.rows:
            row, where = dict(zip(self.columns, values)), f"{self.points}: {name} ({x}, {y})"
            key = row.get("stroke", "").strip()
            if not key:
                last = {}
                continue
            value, s = self.class_name(row["class"], where), number(key)
            if s is None or not value:
                raise DataError(f"{where}: stroke {key!r}: a stroke is a whole number from 0, with a class")
            if (last.get("stroke"), last.get("image"), last.get("class")) == (s, name, value):
                last["points"].append([x, y])
            elif s in done:
                raise DataError(f"{where}: stroke {s} again: its rows are consecutive, one image, one class")
            else:
                last = {"image": name, "stroke": s, "class": value, "points": [[x, y]]}
                shown.append(last)
                done.add(s)
        return [s for s in shown if image in (None, s["image"])]

    def class_name(self, written, where):
        """A class as written -> its name ('' for none yet; an index names its class), or one line."""
        value = written.strip()
        if value.isdigit() and value not in self.names and int(value) < len(self.names):
            value = self.names[int(value)]
        if value not in self.names + [""]:
            raise DataError(f"{where}: class {value!r} is not one of {', '.join(self.names)}")
        return value

    def change(self, body):
        """A point: {"image", "x", "y", "class"} gives the points at (x, y) that class, or adds one; without
        "class" it removes them. A stroke: {"image", "stroke": [[x, y], ...], "class"} adds one, {"image",
        "stroke": number} removes it. Every other row and column stays as written. -> the image's points and
        strokes, as saved."""
        name = body["image"]
        if name not in self.info:
            raise ValueError("image must be one of the folder's")
        if "class" in body and body["class"] not in self.names:
            raise ValueError(f"class {body['class']!r} is not one of {', '.join(self.names)}")
        with self.lock:
            columns, rows = self.stroke_change(body) if "stroke" in body else self.point_change(body)
            write_back(self.points, columns, rows, self.how)  # OSError (a full disk): memory keeps the disk's
            self.columns, self.rows = columns, rows
            return {"clicks": self.clicks(name), "strokes": self.strokes(name)}

    def point_change(self, body):
        name, c = body["image"], self.columns.index("class")
        at = (name, *self.pixel(name, [body["x"], body["y"]]))
        point = [r[:3] == at and self.stroke(r) is None for r in self.rows]  # a stroke's vertex stays
        if self.blind and not (any(point) and "class" in body):  # a probability sample: its points, no other
            raise ValueError("blind mode: only the sample's points take a class, and each stays")
        rows = []
        for r, here in zip(self.rows, point):  # the other rows as they are; the point at (x, y) takes a class
            if not here:
                rows.append(r)
            elif "class" in body:
                rows.append((*at, r[3][:c] + [body["class"]] + r[3][c + 1:]))
        if "class" in body and not any(point):
            rows.append((*at, self.new_row(self.columns, *at, body["class"])))
        return self.columns, rows

    def stroke_change(self, body):
        name, given = body["image"], body["stroke"]  # its vertices to add, or its number to remove
        if self.blind:
            raise ValueError("blind mode: a sample is points, never a stroke")
        if "class" not in body:  # removes the stroke of that number (none: nothing to remove)
            if type(given) is not int:
                raise ValueError("a stroke to remove is its number")
            return self.columns, [r for r in self.rows if r[0] != name or self.stroke(r) != given]
        if type(given) is not list or not 0 < len(given) <= VERTICES:
            raise ValueError(f"a stroke is a list of 1 to {VERTICES} [x, y] vertices")
        columns = self.columns + ["stroke"] * ("stroke" not in self.columns)  # added at the first stroke
        rows = [(*r[:3], r[3] + [""] * (len(columns) - len(r[3]))) for r in self.rows]
        s = 1 + max((self.stroke(r) for r in self.rows if self.stroke(r) is not None), default=0)
        for x, y in (self.pixel(name, xy) for xy in given):
            rows.append((name, x, y, self.new_row(columns, name, x, y, body["class"], str(s))))
        return columns, rows

    def pixel(self, name, xy):
        """[x, y] -> (x, y), whole numbers on the image, or a ValueError."""
        (w, h), _ = self.info[name]
        if type(xy) is not list or len(xy) != 2 or any(type(v) is not int for v in xy):
            raise ValueError(f"{str(xy)[:20]}: x and y are whole numbers")
        if not (0 <= xy[0] < w and 0 <= xy[1] < h):
            raise ValueError(f"({xy[0]}, {xy[1]}) is outside {name} ({w}x{h})")
        return tuple(xy)

    def stroke(self, row):
        """The stroke number of a row, None for a point."""
        return number(row[3][self.columns.index("stroke")].strip()) if "stroke" in self.columns else None

    def new_row(self, columns, name, x, y, cls, stroke=""):
        new = {"image": name, "x": str(x), "y": str(y), "class": cls, "stroke": stroke}
        return [new.get(k, "") for k in columns]

    def shown(self, i):
        """Image i as the page shows it: JPEG bytes, its longest side at most SHOWN."""
        if ("image", i) not in self.cache:
            s = scene.read_scene(self.files[i][1])
            picture = Image.fromarray(display(s["samples"], s["valid"], self.show))
            picture.thumbnail((SHOWN, SHOWN))
            self.cache = {("image", i): encoded(picture, "JPEG")}  # one image at a time: scenes can be large
        return self.cache[("image", i)]

    def mapped(self, i):
        """The model's map of image i (PNG bytes, as the page shows it) and its suggested next clicks."""
        if ("map", i) not in self.cache:
            with self.model_lock:  # one map at a time: each takes every core
                s = scene.read_scene(self.files[i][1])
                image, norm = model_input(s, self.meta)
                logits_of = partial(predict.sliding_window, self.model, dtype=self.dtype, norm=norm)
                pred, margin = maps.map_in_blocks(logits_of, image, margin=True)
            if s["valid"] is not None:
                margin[~s["valid"]] = np.inf
            picture = maps.colourize(pred, self.colours)
            picture.thumbnail((SHOWN, SHOWN), Image.NEAREST)
            near = predict.suggest_clicks(margin.astype(np.float32), self.suggest)
            hints = [{"x": x, "y": y, "hint": self.names[pred[y, x]]} for x, y in near]
            self.cache[("map", i)] = (encoded(picture, "PNG"), hints)
        return self.cache[("map", i)]

    def state(self):
        colours = ["#%02X%02X%02X" % tuple(c) for c in self.colours]
        return {"images": [{"name": n, "width": self.info[n][0][0], "height": self.info[n][0][1]}
                           for n, _ in self.files],
                "classes": [{"name": n, "colour": c} for n, c in zip(self.names, colours)],
                "clicks": self.clicks(), "strokes": self.strokes(), "vertices": VERTICES,
                "model": self.model is not None, "blind": self.blind}


def encoded(picture, kind):
    buffer = io.BytesIO()
    picture.save(buffer, kind)
    return buffer.getvalue()


def read_classes(given, root, written):
    """--classes as a classes.json or as names 'Water,Land,...'; else ROOT/classes.json; else the
    classes written in the clicks file -> (names, colours). Names are sorted, as train.py sorts the
    classes it finds in clicks, so keys, colours and the trained model agree each time the page starts."""
    if given and not given.endswith(".json"):
        names = sorted({n.strip() for n in given.split(",") if n.strip()})
        if not names:
            raise DataError(f"--classes {given!r}: no class name (a classes.json, or names: Water,Land,...)")
        return names, layout.default_colours(names)
    if given:
        if not Path(given).is_file():
            raise DataError(f"--classes {given}: no such file (a classes.json, or names: Water,Land,...)")
        return layout.read_classes(given)
    names = sorted({w.strip() for w in written} - {""})
    found = layout.read_classes(root, required=False)
    if found is None and not names:
        raise DataError(f"{root}: no classes.json and no clicks yet: give --classes Water,Land,Road,...")
    return found or (names, layout.default_colours(names))


class Handler(BaseHTTPRequestHandler):
    """GET /, /label.js, /state, /image/I, /map/I, /suggestions/I; POST /change, from this server's page
    only (else a 403). No such page: 404, a bad request: 400, a change the disk refuses: 507; one log
    line each."""
    timeout = 60  # a client that stops sending mid-request frees its thread

    def do_GET(self):
        labels, parts = self.server.labels, self.path.split("?")[0].strip("/").split("/")
        if not self.accepted(write=False):
            return
        try:
            if parts == [""]:
                return self.reply(PAGE.read_bytes(), "text/html; charset=utf-8")
            if parts == ["label.js"]:
                return self.reply(SCRIPT.read_bytes(), "text/javascript; charset=utf-8")
            if parts == ["state"]:
                return self.reply(json.dumps(labels.state()).encode(), "application/json")
            i = number(parts[1]) if len(parts) == 2 else None
            known = i is not None and i < len(labels.files)
            if parts[0] == "image" and known:
                return self.reply(labels.shown(i), "image/jpeg")
            if parts[0] in ("map", "suggestions") and known and labels.model:
                picture, hints = labels.mapped(i)
                return self.reply(picture, "image/png") if parts[0] == "map" else \
                    self.reply(json.dumps(hints).encode(), "application/json")
        except DataError as e:  # an image of the folder that cannot be read
            return self.send_error(500, str(e))
        self.send_error(404, "no such page or image")

    def do_POST(self):
        if not self.accepted(write=True):
            return
        if self.path != "/change":
            return self.send_error(404, "no such page")
        length, refused = label_guard.body_length(self.headers)
        if refused:
            return self.send_error(*refused)
        body = self.rfile.read(length)
        try:
            saved = self.server.labels.change(json.loads(body))
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # not JSON, or not a click here
            return self.send_error(400, f"bad change: {e}")
        except OSError as e:  # a full disk: nothing changed, in the file or in memory
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            return self.send_error(507 if full else 500, f"not saved: {e.strerror or e}")
        self.reply(json.dumps(saved).encode(), "application/json")

    def accepted(self, write):
        """-> whether this server takes the request; if not, its 4xx is sent."""
        if not self.path.isascii():
            self.send_error(400, "the path is not ASCII")
            return False
        why = label_guard.refusal(self.headers, self.server, write)
        if why:
            self.send_error(403, f"refused: {why}")
        return why is None

    def end_headers(self):  # every answer, an error page too, carries the page's policy
        self.send_header("Content-Security-Policy", POLICY)
        super().end_headers()

    def reply(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):  # a reason phrase is Latin-1: keep it ASCII
        super().send_error(code, message.encode("ascii", "backslashreplace").decode(), explain)

    def log_error(self, format, *args):  # send_error's reason: said on the request's own line below
        self.reason = format % args

    def log_request(self, code="-", size="-"):
        self.log_message('"%s" %s %s', self.requestline, code, getattr(self, "reason", ""))


def serve(args):
    """-> the server, listening (not yet serving): main() runs it, tests start it in a thread."""
    if args.suggest < 0:
        raise DataError(f"--suggest {args.suggest}: a number of clicks per image, 0 or more")
    show = band_list(args.show_bands, "--show-bands", counts=(1, 3)) if args.show_bands else None
    labels = Labels(args.dir, args.points, args.classes, args.ckpt, args.suggest, show)
    check_writable(Path(args.points).resolve().parent, "--points")
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except (OSError, OverflowError) as e:  # in use, no such address, a port past 65535
        raise DataError(f"--host {args.host} --port {args.port}: cannot listen there ({e})")
    Path(args.points).resolve().parent.mkdir(parents=True, exist_ok=True)  # every input checked
    server.labels = labels
    if not label_guard.listen_on(server, args.host, secrets.token_urlsafe()):  # a new token each start
        print(f"warning: --host {args.host}: anyone who can reach port {server.server_address[1]} can read "
              "the images and, with the token, write clicks")
    server.handle_error = lambda request, address: print(f"error: {sys.exc_info()[1]!r}", file=sys.stderr)
    return server


def get_args(argv=None):
    p = argparse.ArgumentParser(description="A page to click points and draw strokes on your images for "
                                "train.py.")
    p.add_argument("dir", help="the folder of images (as train.py --data reads it)")
    p.add_argument("--points", required=True, help="the clicks file (CSV image,x,y,class[,stroke,...]): read "
                   "at start, written back whole at each change; with a 'sample' column, blind labelling")
    p.add_argument("--classes", help="a classes.json, or class names: Water,Land,Road (sorted; default: "
                   "DIR/classes.json, else the classes of the clicks file)")
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
