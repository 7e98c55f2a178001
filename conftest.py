"""What the tests share: small data sets written once per test run, a trained run, helpers."""
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin
from torchvision.models import resnet34
from torchvision.models.resnet import BasicBlock, ResNet

import resnet_unet
import train
from support import layout, rasters, synthetic

HERE = Path(__file__).parent
needs_gdal = pytest.mark.skipif(rasters.gdal() is None, reason=f"the GIS extra: {rasters.GIS}")
OGR = rasters.gdal() is not None and all(map(importlib.util.find_spec, ["pyogrio", "shapely"]))
needs_ogr = pytest.mark.skipif(not OGR, reason=f"the GIS extra's vector layers: {rasters.GIS}")


# the tests must not depend on how pytest was started: torchrun's variables, if pytest runs under
# it, would make every train.main() here wait for process-group peers
for name in ["WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
    os.environ.pop(name, None)


COLOURS = [(226, 169, 41), (132, 41, 246), (110, 193, 228)]  # a 3-class palette for handmade data sets


def resnet10(weights=None):
    """ResNet-34 with one block per stage instead of 3, 4, 6, 3: the same stages, channels and names."""
    return ResNet(BasicBlock, [1, 1, 1, 1])


def pytest_configure(config):
    config.addinivalue_line("markers", "resnet34: the test builds the lesson's ResNet-34 encoder itself")


@pytest.fixture(scope="session", autouse=True)
def small_encoder():
    """The tests train the U-Net on ResNet-10, a third of ResNet-34's weights: every line of the method,
    the runs and the maps is run as it is, and the whole suite takes three fifths of the time. The tests
    of the network itself are marked resnet34, as are those that run train.py in a process of its own
    beside one in this process (a checkpoint is read by the network that wrote it)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(resnet_unet, "resnet34", resnet10)
        yield


@pytest.fixture(autouse=True)
def lesson_encoder(request, monkeypatch):
    if request.node.get_closest_marker("resnet34"):
        monkeypatch.setattr(resnet_unet, "resnet34", resnet34)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A synthetic data set small enough to train on in a second: 3 tiles of 2 images, 96x96."""
    return synthetic.make_synthetic(tmp_path_factory.mktemp("tiny") / "set", tiles=3, per_tile=2, size=96)


@pytest.fixture(scope="session")
def mini(tmp_path_factory):
    """Smaller still, for tests that train several runs: 2 tiles of one 64x64 image (--patch 32)."""
    return synthetic.make_synthetic(tmp_path_factory.mktemp("mini") / "set", tiles=2, per_tile=1, size=64)


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory):
    """One epoch trained on the tiny set -> (the model train.main returned, its run folder)."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    return train.main(tiny_args(tiny, run)), run


def tiny_args(root, out, *extra):
    return ["--data", str(root), "--out", str(out), "--patch", "64", "--weights", "none", "--epochs", "1",
            "--precision", "fp32", "--device", "cpu", *extra]


def start_script(script, *args):
    """The script started in a process of its own, stdout and stderr piped: tests start several at once,
    each paying the seconds of importing torch while the others do."""
    command = [sys.executable, str(HERE / script), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_set(root, classes, images):
    """A handmade data set: classes.json text, and {relative image path: (image, mask or None)}."""
    root.mkdir(parents=True)
    (root / "classes.json").write_text(classes)
    for rel, (image, mask) in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
        if mask is not None:
            (root / layout.mask_path(Path(rel))).parent.mkdir(parents=True, exist_ok=True)
            mask.save(root / layout.mask_path(Path(rel)))
    return root


def tile_masks(root, tiles, colours):
    """-> (names, images, masks) of the given tiles of a data set in the Kaggle layout."""
    files = layout.tile_files(root, tiles)
    images, _, masks = layout.read_images(files, colours)
    return [n for n, _ in files], images, masks


def classes_json(colours=COLOURS):
    classes = [{"title": f"c{i}", "color": "#%02X%02X%02X" % c} for i, c in enumerate(colours)]
    return json.dumps({"classes": classes})


def write_tiff(path, samples, deflate=False, tile=None, planar=False, extra=()):
    """A TIFF written by hand, as GDAL writes them: (H, W, S) samples, little-endian, in strips of
    8 rows or in square tiles, bands interleaved or in planes, raw or deflated after horizontal
    differencing. The reference the reader is checked against."""
    h, w, s = samples.shape
    bh, bw = (tile, tile) if tile else (8, w)
    blocks = []
    for plane in [samples[..., i : i + 1] for i in range(s)] if planar else [samples]:
        for y in range(0, h, bh):
            for x in range(0, w, bw):
                b = plane[y : y + bh, x : x + bw]
                b = np.pad(b, ((0, bh - b.shape[0]), (0, bw - b.shape[1]), (0, 0))) if tile else b
                b = np.diff(b, axis=1, prepend=np.zeros_like(b[:, :1])) if deflate else b
                raw = b.astype(samples.dtype.newbyteorder("<")).tobytes()
                blocks.append(zlib.compress(raw) if deflate else raw)
    offsets = [8 + sum(map(len, blocks[:i])) for i in range(len(blocks))]
    kind = {"u": 1, "i": 2, "f": 3}[samples.dtype.kind]
    tags = {256: [w], 257: [h], 258: [samples.dtype.itemsize * 8] * s, 259: [8 if deflate else 1],
            262: [2 if s >= 3 else 1], 277: [s], 284: [2 if planar else 1], 317: [2 if deflate else 1],
            339: [kind] * s, **({338: list(extra)} if extra else {})}
    names = (322, 323, 324, 325) if tile else (None, 278, 273, 279)
    tags.update({k: v for k, v in zip(names, [[bw], [bh], offsets, list(map(len, blocks))]) if k})
    body, entries = bytearray(b"II*\0\0\0\0\0" + b"".join(blocks)), []
    for tag in sorted(tags):
        kind = 4 if tag in (256, 257, 273, 278, 279, 324, 325) else 3  # LONG or SHORT
        raw = struct.pack(f"<{len(tags[tag])}{'I' if kind == 4 else 'H'}", *tags[tag])
        body += b"\0" * (len(body) % 2)
        entries.append(struct.pack("<HHI", tag, kind, len(tags[tag])) + (raw.ljust(4, b"\0") if len(raw) <= 4
                                                                         else struct.pack("<I", len(body))))
        body += raw if len(raw) > 4 else b""
    body += b"\0" * (len(body) % 2)
    body[4:8] = struct.pack("<I", len(body))
    Path(path).write_bytes(body + struct.pack("<H", len(entries)) + b"".join(entries) + b"\0" * 4)


def geotiff_tags(transform=None, point=False, tie=(0.0, 0.0, 500000.0, 2800000.0)):
    """GeoTIFF tags of a UTM zone 40N raster in metres: 0.5 m pixels, raster position (i, j) of the
    tie point at map (x, y), or an affine transform; raster coordinates name pixel corners, or pixel
    centres with `point`."""
    tags = {34735: (3, (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 2 if point else 1, 3072, 0, 1, 32640,
                        3076, 0, 1, 9001)), 34737: (2, "WGS 84 / UTM zone 40N|")}
    if transform:
        return {**tags, 34264: (12, tuple(transform))}
    i, j, x, y = tie
    return {**tags, 33550: (12, (0.5, 0.5, 0.0)), 33922: (12, (i, j, 0.0, x, y, 0.0))}


def save_geotiff(path, image, tags):
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, (kind, value) in tags.items():
        info[tag], info.tagtype[tag] = value, kind
    Image.fromarray(image).save(path, tiffinfo=info)


FIXTURES = HERE / "tests" / "fixtures"  # written by GDAL (make.sh there); what GDAL says: *.expected.json
