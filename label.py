"""A page to click points on your images: the clicks train.py --point-labels reads, saved at once; with
a checkpoint, the model's map over the image and where it suggests clicking next.

    python label.py DIR --points clicks.csv [--classes classes.json] [--ckpt runs/x/ckpt.pt] [--port 8000]

The page is label.html. This server gives it the images of DIR (large ones downsampled), the clicks,
and writes the clicks file whole after each change: a temporary file, then a rename.
"""
import argparse
import csv
import io
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clicks
import layout
import maps
import predict
import scene
from cli import DataError, check_writable, command_line
from model import load_checkpoint, model_input
from speed import fold_batch_norm, pick_dtype

HERE = Path(__file__).parent
SHOWN = 2048  # longest side of an image as the page shows it; clicks still land on full-image pixels


class Labels:
    """The images of a folder, the classes, the clicks (in memory and in the clicks file) and, with a
    checkpoint, the model. A lock: two tabs saving at once write the file one after the other."""

    def __init__(self, root, points, classes, ckpt, suggest):
        self.root, self.points, self.suggest = Path(root), Path(points), suggest
        self.files = [(n, p) for n, p, _ in layout.find_images(root)]
        self.info = {n: scene.image_info(p) for n, p in self.files}
        rows = clicks.read_csv(self.points, self.info) if self.points.exists() else []
        self.names, self.colours = read_classes(classes, self.root, rows)
        by_image = clicks.classify(rows, self.names)[0] if rows else {}
        self.clicks = [(n, x, y, self.names[c]) for n, points in by_image.items() for x, y, c in points]
        self.lock, self.model_lock, self.cache = threading.Lock(), threading.Lock(), {}
        self.model, self.meta, self.show = None, None, None
        if ckpt:
            model, meta = load_checkpoint(ckpt)
            if meta["classes"] != self.names:
                raise DataError(f"--ckpt {ckpt}: its classes ({', '.join(meta['classes'])}) are not these")
            self.model, self.meta, self.show = fold_batch_norm(model), meta, meta.get("show_bands")
            # the precision it trained in: the page shows what predict.py --precision of that maps
            self.dtype = pick_dtype(meta.get("precision", "auto"), torch.device("cpu"), model, train=False)

    def change(self, body):
        """{"image", "x", "y", "class"} adds a click; without "class" it removes the clicks at (x, y).
        -> the image's clicks, as saved."""
        name, x, y = body["image"], body["x"], body["y"]
        if name not in self.info or type(x) is not int or type(y) is not int:
            raise ValueError("image must be one of the folder's, x and y whole numbers")
        (w, h), _ = self.info[name]
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"({x}, {y}) is outside {name} ({w}x{h})")
        if "class" in body and body["class"] not in self.names:
            raise ValueError(f"class {body['class']!r} is not one of {', '.join(self.names)}")
        with self.lock:
            self.clicks = [c for c in self.clicks if c[:3] != (name, x, y)]
            if "class" in body:
                self.clicks.append((name, x, y, body["class"]))
            tmp = self.points.with_name(self.points.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([("image", "x", "y", "class"), *self.clicks])
            os.replace(tmp, self.points)  # the file is the old one or the new one, never half of either
            return [c for c in self.clicks if c[0] == name]

    def shown(self, i):
        """Image i as the page shows it: JPEG bytes, its longest side at most SHOWN."""
        if ("image", i) not in self.cache:
            s = scene.read_scene(self.files[i][1])
            picture = Image.fromarray(scene.display(s["samples"], s["valid"], self.show))
            picture.thumbnail((SHOWN, SHOWN))
            self.cache = {("image", i): encoded(picture, "JPEG")}  # one image at a time: scenes can be large
        return self.cache[("image", i)]

    def mapped(self, i):
        """The model's map of image i (PNG bytes, as the page shows it) and its suggested next clicks."""
        if ("map", i) not in self.cache:
            with self.model_lock:  # one map at a time: each takes every core
                s = scene.read_scene(self.files[i][1])
                image, norm = model_input(s, self.meta)
                pred, margin = maps.map_in_bands(self.model, image, self.dtype, margin=True, norm=norm)
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
                "clicks": [dict(zip(("image", "x", "y", "class"), c)) for c in self.clicks],
                "model": self.model is not None}


def encoded(picture, kind):
    buffer = io.BytesIO()
    picture.save(buffer, kind)
    return buffer.getvalue()


def read_classes(given, root, rows):
    """--classes as a classes.json or as names 'Water,Land,...'; else ROOT/classes.json; else the
    classes of the clicks file -> (names, colours). Names are sorted, as train.py sorts the classes
    it finds in clicks, so keys, colours and the trained model agree each time the page starts."""
    if given and not given.endswith(".json"):
        names = sorted({n.strip() for n in given.split(",") if n.strip()})
        return names, layout.default_colours(len(names))
    if given:
        if not Path(given).is_file():
            raise DataError(f"--classes {given}: no such file (a classes.json, or names: Water,Land,...)")
        return layout.read_classes(given)
    names = sorted({r[4] for r in rows} - {""})
    found = layout.read_classes(root, required=False)
    if found is None and not names:
        raise DataError(f"{root}: no classes.json and no clicks yet: give --classes Water,Land,Road,...")
    return found or (names, layout.default_colours(len(names)))


class Handler(BaseHTTPRequestHandler):
    """GET /, /state, /image/I, /map/I, /suggestions/I; POST /change. Anything else is a 404, a bad
    change a 400, each with one log line."""

    def do_GET(self):
        labels, parts = self.server.labels, self.path.split("?")[0].strip("/").split("/")
        try:
            if parts == [""]:
                return self.reply((HERE / "label.html").read_bytes(), "text/html; charset=utf-8")
            if parts == ["state"]:
                return self.reply(json.dumps(labels.state()).encode(), "application/json")
            i = int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else len(labels.files)
            if parts[0] == "image" and i < len(labels.files):
                return self.reply(labels.shown(i), "image/jpeg")
            if parts[0] in ("map", "suggestions") and i < len(labels.files) and labels.model is not None:
                picture, hints = labels.mapped(i)
                return self.reply(picture, "image/png") if parts[0] == "map" else \
                    self.reply(json.dumps(hints).encode(), "application/json")
        except DataError as e:  # an image of the folder that cannot be read
            return self.send_error(500, str(e))
        self.send_error(404, "no such page or image")

    def do_POST(self):
        if self.path != "/change":
            return self.send_error(404, "no such page")
        length = int(self.headers.get("Content-Length") or 0)
        if length > 10_000:
            return self.send_error(413, "a change is one click")
        try:
            saved = self.server.labels.change(json.loads(self.rfile.read(length)))
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a click of this folder
            return self.send_error(400, f"bad change: {e}")
        self.reply(json.dumps([dict(zip(("image", "x", "y", "class"), c)) for c in saved]).encode(),
                   "application/json")

    def reply(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_error(self, format, *args):  # send_error's reason: said on the request's own line below
        self.reason = format % args

    def log_request(self, code="-", size="-"):
        self.log_message('"%s" %s %s', self.requestline, code, getattr(self, "reason", ""))


def serve(args):
    """-> the server, listening (not yet serving): main() runs it, tests start it in a thread."""
    labels = Labels(args.dir, args.points, args.classes, args.ckpt, args.suggest)
    check_writable(Path(args.points).resolve().parent, "--points")
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except (OSError, OverflowError) as e:  # in use, no such address, a port past 65535
        raise DataError(f"--host {args.host} --port {args.port}: cannot listen there ({e})")
    server.labels = labels
    server.handle_error = lambda request, address: print(f"error: {sys.exc_info()[1]!r}", file=sys.stderr)
    return server


def get_args(argv=None):
    p = argparse.ArgumentParser(description="A page to click points on your images for train.py.")
    p.add_argument("dir", help="the folder of images (as train.py --data reads it)")
    p.add_argument("--points", required=True, help="the clicks file (CSV image,x,y,class): read at start, "
                   "written at each change")
    p.add_argument("--classes", help="a classes.json, or class names: Water,Land,Road (sorted; default: "
                   "DIR/classes.json, else the classes of the clicks file)")
    p.add_argument("--ckpt", help="a checkpoint of train.py: its map (key m) and where to click next")
    p.add_argument("--suggest", type=int, default=10, help="suggested clicks per image, with --ckpt "
                   "(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                   "machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 picks a free one)")
    return p.parse_args(argv)


def main(argv=None):
    server = serve(get_args(argv))
    host, port = server.server_address[:2]
    print(f"labelling {len(server.labels.files)} images of {server.labels.root}: open http://{host}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(command_line(main))
