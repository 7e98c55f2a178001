"""A page to click points on your images: the clicks train.py --point-labels reads, saved at once; with
a checkpoint, the model's map over the image and where it suggests clicking next.

    python label.py DIR --points clicks.csv [--classes classes.json] [--ckpt runs/x/ckpt.pt] [--port 8000]

The page is label.html. This server gives it the images of DIR (large ones downsampled), the clicks,
and writes the clicks file whole after each change: a temporary file, then a rename. A clicks file
with a 'sample' column (assess.py's) opens in blind mode: its points one by one, never the map.
"""
import argparse
import csv
import errno
import io
import ipaddress
import json
import os
import secrets
import sys
import tempfile
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
from cli import DataError, band_list, check_writable, command_line
from model import load_checkpoint, model_input
from speed import fold_batch_norm, pick_dtype

HERE = Path(__file__).parent
SHOWN = 2048  # longest side of an image as the page shows it; clicks still land on full-image pixels
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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
        self.lock, self.model_lock, self.cache = threading.Lock(), threading.Lock(), {}
        self.model, self.meta, self.show = None, None, show
        if ckpt and self.blind:
            print(f"--ckpt {ckpt} ignored: {self.points} has a 'sample' column (blind labelling: the person "
                  "must not see what the map says)")
        elif ckpt:
            model, meta = load_checkpoint(ckpt)
            if meta["classes"] != self.names:
                raise DataError(f"--ckpt {ckpt}: its classes ({', '.join(meta['classes'])}) are not these")
            self.model, self.meta = fold_batch_norm(model), meta
            self.show = show or meta.get("show_bands")  # the bands the run showed, unless others are asked
            # the precision it trained in: the page shows what predict.py --precision of that maps
            self.dtype = pick_dtype(meta.get("precision", "auto"), torch.device("cpu"), model, train=False)

    def clicks(self, image=None):
        """The rows the page shows (all, or one image's): image, x, y, class ('' when not given yet; an
        index names its class), and in blind mode the point's number in the sample."""
        shown = []
        for name, x, y, values in self.rows:
            row = dict(zip(self.columns, values))
            value, where = row["class"].strip(), f"{self.points}: {name} ({x}, {y})"
            if value.isdigit() and value not in self.names and int(value) < len(self.names):
                value = self.names[int(value)]
            if value not in self.names + [""]:
                raise DataError(f"{where}: class {value!r} is not one of {', '.join(self.names)}")
            sample = number(row["sample"].strip()) if self.blind else None
            if self.blind and sample is None:
                raise DataError(f"{where}: sample {row['sample']!r} is not a point's number")
            if image in (None, name):
                shown.append({"image": name, "x": x, "y": y, "class": value} |
                             ({"sample": sample} if self.blind else {}))
        return shown

    def change(self, body):
        """{"image", "x", "y", "class"} gives the rows at (x, y) that class, or adds a row; without "class"
        it removes them. Every other row and column stays as written. -> the image's clicks, as saved."""
        name, x, y = body["image"], body["x"], body["y"]
        if name not in self.info or type(x) is not int or type(y) is not int:
            raise ValueError("image must be one of the folder's, x and y whole numbers")
        (w, h), _ = self.info[name]
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"({x}, {y}) is outside {name} ({w}x{h})")
        if "class" in body and body["class"] not in self.names:
            raise ValueError(f"class {body['class']!r} is not one of {', '.join(self.names)}")
        at, c = (name, x, y), self.columns.index("class")
        with self.lock:
            here = [r for r in self.rows if r[:3] == at]
            if self.blind and not (here and "class" in body):  # a probability sample: its points, no other
                raise ValueError("blind mode: only the sample's points take a class, and each stays")
            rows = []
            for r in self.rows:  # the other rows as they are; those at (x, y) take the class, in place
                if r[:3] != at:
                    rows.append(r)
                elif "class" in body:
                    rows.append((*at, r[3][:c] + [body["class"]] + r[3][c + 1:]))
            if "class" in body and not here:
                new = {"image": name, "x": str(x), "y": str(y), "class": body["class"]}
                rows.append((*at, [new.get(k, "") for k in self.columns]))
            self.save(rows)  # OSError (a full disk): the rows in memory stay those on disk
            self.rows = rows
            return self.clicks(name)

    def save(self, rows):
        """Write the clicks file whole: a new temporary file beside it (made here, so that a link planted
        there is never followed), then a rename: the file is the old one or the new one, never half."""
        handle, tmp = tempfile.mkstemp(prefix=self.points.name + ".", suffix=".tmp", dir=self.points.parent)
        try:
            os.chmod(tmp, self.how["mode"])
            with open(handle, "w", newline="", encoding="utf-8-sig" if self.how["bom"] else "utf-8") as f:
                written = csv.writer(f, lineterminator=self.how["newline"])
                written.writerows([self.columns, *(r[3] for r in rows)])
                f.flush()
                os.fsync(f.fileno())  # a full disk may say so only here
            os.replace(tmp, self.points)
        except BaseException:
            os.unlink(tmp)
            raise

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
                "clicks": self.clicks(), "model": self.model is not None, "blind": self.blind}


def read_points(path, info):
    """The clicks file as written -> (columns, rows [(image name, x, y, [values as written])], how it is
    written: {"bom", "newline", "mode"}), so that a change writes back every row and column it keeps."""
    if not path.exists() or path.stat().st_size == 0:
        umask = os.umask(0o22)  # reading it means setting it: put back at once
        os.umask(umask)
        return ["image", "x", "y", "class"], [], {"bom": False, "newline": "\r\n", "mode": 0o666 & ~umask}
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is no part of 'image'
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
    if text.lstrip()[:1] in ("{", "["):
        raise DataError(f"{path}: GeoJSON, and the page reads and writes CSV (image,x,y,class): give "
                        "--points a new .csv; train.py --point-labels takes both files")
    how = {"bom": raw.startswith(b"\xef\xbb\xbf"), "mode": path.stat().st_mode & 0o777,
           "newline": "\r\n" if text.split("\n", 1)[0].endswith("\r") else "\n"}
    lines = csv.reader(io.StringIO(text, newline=""))
    columns, find, rows = next(lines, []), clicks.image_finder(info), []
    if not {"image", "x", "y", "class"} <= set(columns):
        raise DataError(f"{path}: expected columns image,x,y,class (found {','.join(columns)})")
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
        return names, layout.default_colours(len(names))
    if given:
        if not Path(given).is_file():
            raise DataError(f"--classes {given}: no such file (a classes.json, or names: Water,Land,...)")
        return layout.read_classes(given)
    names = sorted({w.strip() for w in written} - {""})
    found = layout.read_classes(root, required=False)
    if found is None and not names:
        raise DataError(f"{root}: no classes.json and no clicks yet: give --classes Water,Land,Road,...")
    return found or (names, layout.default_colours(len(names)))


def number(text):
    """'12' -> 12; anything else ('-1', '1e3', '²', '') -> None."""
    return int(text) if text.isascii() and text.isdigit() else None


class Handler(BaseHTTPRequestHandler):
    """GET /, /state, /image/I, /map/I, /suggestions/I; POST /change, from this server's page only (else
    a 403). No such page: 404, a bad request: 400, a change the disk refuses: 507; one log line each."""
    timeout = 60  # a client that stops sending mid-request frees its thread

    def do_GET(self):
        labels, parts = self.server.labels, self.path.split("?")[0].strip("/").split("/")
        if not self.accepted(write=False):
            return
        try:
            if parts == [""]:
                return self.reply((HERE / "label.html").read_bytes(), "text/html; charset=utf-8")
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
        length = self.headers.get("Content-Length")
        if length is None:
            return self.send_error(411, "a change says its Content-Length")
        if number(length) is None or number(length) > 10_000:
            return self.send_error(400 if number(length) is None else 413, f"Content-Length {length!r}: a "
                                   "change is one click")
        body = self.rfile.read(number(length))
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
        why = refusal(self.headers, self.server, write)
        if why:
            self.send_error(403, f"refused: {why}")
        return why is None

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


def refusal(headers, server, write):
    """-> why a request is not from this server's page, or None. Host must be this server's address
    (DNS rebinding sends a name of the attacker's); Origin too, when sent (another site's page sends
    its own); a change must be JSON (a form cannot send that) and carry the token of the printed address."""
    host, origin = headers.get("Host", ""), headers.get("Origin")
    if not ours(host, server):
        return f"Host {host!r} is not this server's address"
    if origin is not None and not (origin.startswith("http://") and ours(origin[7:], server)):
        return f"Origin {origin!r} is not this server's page"
    if write and headers.get_content_type() != "application/json":
        return "a change is JSON (Content-Type: application/json)"
    given = headers.get("X-Token", "").encode("latin-1")
    if write and not secrets.compare_digest(given, server.token.encode()):
        return "no token, or another start's: open the address label.py printed"
    return None


def ours(address, server):
    """Is `address` (host:port, as Host and Origin give it) this server's? Its port, and a loopback name
    (on a loopback server), the --host given, or on 0.0.0.0 any IP address: never another name, which
    is what DNS rebinding sends."""
    name, _, port = address.lower().rpartition(":")
    if port != str(server.server_address[1]):
        return False
    try:
        return name.strip("[]") in server.names or server.everywhere and bool(ipaddress.ip_address(name))
    except ValueError:
        return False


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
    server.labels, server.token = labels, secrets.token_urlsafe()  # a new token each start
    host = args.host.lower()
    server.everywhere, loopback = host in ("", "0.0.0.0"), host in LOOPBACK or host.startswith("127.")
    server.names = {host} | (LOOPBACK if loopback or server.everywhere else set())
    if not loopback:
        print(f"warning: --host {args.host}: anyone who can reach port {server.server_address[1]} can read "
              "the images and, with the token, write clicks")
    server.handle_error = lambda request, address: print(f"error: {sys.exc_info()[1]!r}", file=sys.stderr)
    return server


def get_args(argv=None):
    p = argparse.ArgumentParser(description="A page to click points on your images for train.py.")
    p.add_argument("dir", help="the folder of images (as train.py --data reads it)")
    p.add_argument("--points", required=True, help="the clicks file (CSV image,x,y,class[,...]): read at "
                   "start, written back whole at each change; with a 'sample' column, blind labelling")
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
