"""Reading what remote sensing produces, for train.py and predict.py alike: images of any size, bit
depth and band count as 8-bit RGB, their no-data pixels, and their place on the map (GeoTIFF tags or
a world file). TIFFs that Pillow refuses are decoded here.
"""
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin

from cli import DataError

# the GeoTIFF tags that place a raster on the map: pixel size, tie point, or an affine transform;
# the coordinate reference system is in the three GeoKey tags
GEO_TAGS = [33550, 33922, 34264, 34735, 34736, 34737]
NODATA = 42113  # GDAL's no-data value, as text
WORLD_FILES = [".tfw", ".tifw", ".jgw", ".jpgw", ".pgw", ".pngw", ".wld"]  # beside an image: its world file


# ---------------------------------------------------------------------------- reading


def read_scene(path, bands=None):
    """An image to map -> dict: rgb (H, W, 3) uint8; valid (H, W) bool or None (False where the
    scene has no data: alpha 0 or GDAL's no-data value); note: what was done to the pixels; geo:
    the georeferencing or None. `bands` (counted from 1) picks 1 or 3 of the file's bands."""
    path = Path(path)
    # Pillow refuses images over 179 MP, a guard against decompression bombs from untrusted
    # sources; an orthomosaic the user asked to map is often larger. Lifted for it alone.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        tags = tiff_tags(path)
        samples, valid, alpha = pixels_of(path, tags)
    except (OSError, ValueError, SyntaxError, KeyError, zlib.error) as e:
        raise DataError(f"{path}: cannot read image ({e})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    notes, n = [], samples.shape[2]
    if bands:
        if max(bands) > n:
            raise DataError(f"{path}: has {n} band(s), --bands asks for band {max(bands)}")
        samples = samples[..., [b - 1 for b in bands]]
        notes.append(f"bands {','.join(map(str, bands))} of {n}")
    elif n > 3:
        samples = samples[..., :3]
        notes.append(f"{n} bands{' and alpha' if alpha else ''}: using 1,2,3 (others with --bands)")
    if samples.dtype != np.uint8:
        samples, note = stretch(samples, valid)
        notes.append(note)
    if samples.shape[2] < 3:  # one band (or two): shown as grey
        samples = np.repeat(samples[..., :1], 3, axis=2)
    geo = georeference(path, tags, samples.shape[1::-1])
    return {"rgb": np.ascontiguousarray(samples), "valid": valid, "note": "; ".join(notes), "geo": geo}


def image_info(path):
    """-> ((width, height), georeferencing or None), read from the file's header: no pixel decoded."""
    path = Path(path)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        tags = tiff_tags(path)
        if tags:
            size = (tags[256], tags[257])
        else:
            with Image.open(path) as im:
                size = im.size
    except (OSError, ValueError, SyntaxError, KeyError) as e:
        raise DataError(f"{path}: cannot read image ({e})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return size, georeference(path, tags, size)


def tiff_tags(path):
    """The tags of a TIFF's first image, read by Pillow's parser alone (Image.open also judges the
    pixel layout and refuses many multi-band ones), or {} for any other file."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return {}
        tags = TiffImagePlugin.ImageFileDirectory_v2(head if head[2:4] in (b"+\0", b"\0+") else head[:8])
        f.seek(tags.next)
        tags.load(f)
    return tags


def pixels_of(path, tags):
    """-> (samples (H, W, bands) in the file's own type, valid or None, whether an alpha band was
    taken off). Pillow decodes what it can without loss; TIFFs that it refuses or would cut down
    to 8-bit RGB (more than 4 bands, or several bands of more than 8 bits) are read here."""
    count, bits = tags.get(277, 1), tags.get(258, (8,))[0]
    if count > 4 or (count > 1 and bits > 8):
        samples = tiff_samples(path, tags)
        extra = tags.get(338, ())  # what the bands after the colour ones are: 1 and 2 mean alpha
        alpha = (extra if isinstance(extra, tuple) else (extra,))[-1:] in [(1,), (2,)]
    else:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "RGB", "RGBX", "RGBA", "LA"):
                samples = np.asarray(im)
                alpha = im.mode in ("RGBA", "LA")
            else:  # palette, CMYK, YCbCr, 1-bit...: Pillow's conversion
                samples, alpha = np.asarray(im.convert("RGB")), False
        samples = samples[..., None] if samples.ndim == 2 else samples
    valid = samples[..., -1] > 0 if alpha else None
    samples = samples[..., :-1] if alpha else samples
    if NODATA in tags:  # GDAL's no-data value: a pixel whose every band holds it
        value = float(str(tags[NODATA]).strip("\x00 "))
        nodata = (np.isnan(samples) if math.isnan(value) else samples == value).all(-1)
        valid = ~nodata if valid is None else valid & ~nodata
    return samples, valid, alpha


def tiff_samples(path, tags):
    """The samples of a TIFF as stored -> (H, W, bands): uncompressed or deflate, with or without
    horizontal differencing, in strips or tiles, bands interleaved or in planes."""
    w, h = tags[256], tags[257]
    bands, bits, kind = tags.get(277, 1), tags[258][0], {1: "u", 2: "i", 3: "f"}[tags.get(339, (1,))[0]]
    compression, predictor, planar = tags.get(259, 1), tags.get(317, 1), tags.get(284, 1)
    if compression not in (1, 8, 32946) or predictor not in (1, 2) or bits not in (8, 16, 32, 64):
        raise DataError(f"{path}: {bands} bands of {bits} bits, TIFF compression {compression}, predictor "
                        f"{predictor}: read here uncompressed or deflated only (convert it, e.g. "
                        "gdal_translate -co COMPRESS=DEFLATE in.tif out.tif)")
    with open(path, "rb") as f:
        dtype = np.dtype(kind + str(bits // 8)).newbyteorder("<" if f.read(2) == b"II" else ">")
        tiled = 322 in tags
        bw, bh = (tags[322], tags[323]) if tiled else (w, tags.get(278, h))
        offsets, counts = (tags[324], tags[325]) if tiled else (tags[273], tags[279])
        across, per_plane = math.ceil(w / bw), math.ceil(w / bw) * math.ceil(h / bh)
        s = bands if planar == 1 else 1  # samples per pixel in one block
        out = np.empty((h, w, bands), dtype)
        for k, (offset, count) in enumerate(zip(offsets, counts)):
            f.seek(offset)
            raw = f.read(count)
            raw = zlib.decompress(raw) if compression != 1 else raw
            plane, k = divmod(k, per_plane)
            y0, x0 = k // across * bh, k % across * bw
            rows = min(bh, h - y0) if not tiled else bh  # the last strip may be short
            block = np.frombuffer(raw, dtype, rows * bw * s).reshape(rows, bw, s)
            if predictor == 2:  # each sample was stored as its difference to the pixel on its left
                block = np.cumsum(block, axis=1, dtype=dtype)
            rows, cols = min(rows, h - y0), min(bw, w - x0)
            out[y0 : y0 + rows, x0 : x0 + cols, plane * s : plane * s + s] = block[:rows, :cols]
    return out


def stretch(samples, valid, low=2, high=98):
    """Each band to 0..255 between its low and high percentiles over the scene's valid pixels, as
    GIS tools show 16-bit and float imagery -> (uint8 samples, what was done, in words)."""
    step = max(1, int(math.sqrt(samples.shape[0] * samples.shape[1] / 1e6)))  # a million pixels suffice
    sub = samples[::step, ::step].reshape(-1, samples.shape[2])
    if valid is not None:
        sub = sub[valid[::step, ::step].reshape(-1)]
    n = samples.shape[2]
    lo, hi = np.percentile(sub, [low, high], axis=0) if len(sub) else (np.zeros(n), np.ones(n))
    scale = 255 / np.maximum(hi - lo, 1e-12)
    out = np.empty(samples.shape, np.uint8)
    for y in range(0, len(samples), 256):  # in strips: a float copy of a whole scene could be gigabytes
        out[y : y + 256] = np.clip((samples[y : y + 256] - lo) * scale, 0, 255).astype(np.uint8)
    bits = f"{samples.dtype.itemsize * 8}-bit{' float' if samples.dtype.kind == 'f' else ''}"
    ranges = ", ".join(f"{a:g}-{b:g}" for a, b in zip(lo, hi))
    return out, f"{bits}: stretched per band between percentiles {low} and {high} ({ranges})"


# ---------------------------------------------------------------------------- the map


def georeference(path, tags, size):
    """-> None, or dict: tags (GeoTIFF tag -> (type, value)), world (the six numbers of a world
    file: x and y pixel size and rotation, then the map x, y of the top-left pixel's centre), prj
    (a .prj file beside the image), pixel_m2 (a pixel's area in square metres, None if unknown)."""
    tags = {k: (tags.tagtype[k], tags[k]) for k in GEO_TAGS if k in tags}
    world = world_from_tags(tags)  # the file's own tags first, as GDAL does, then a world file beside it
    if world is None:
        beside = [path.with_suffix(s) for s in WORLD_FILES]
        world = next((read_world_file(p) for p in beside if p.exists()), None)
    if world is None:
        return None
    prj = path.with_suffix(".prj")
    return {"tags": tags, "world": world, "prj": prj if prj.exists() else None,
            "pixel_m2": pixel_area(world, geo_keys(tags), size)}


def map_to_pixel(world, x, y):
    """Map coordinates -> (column, row) in pixels, whole numbers at pixel centres (world file numbers:
    x = a col + b row + c, y = d col + e row + f, with (c, f) the centre of the top-left pixel)."""
    a, d, b, e, c, f = world
    det = a * e - b * d
    return (e * (x - c) - b * (y - f)) / det, (a * (y - f) - d * (x - c)) / det


def pixel_to_map(world, col, row):
    a, d, b, e, c, f = world
    return a * col + b * row + c, d * col + e * row + f


def epsg(geo):
    """The EPSG code of a georeferenced scene's coordinate system (GeoTIFF keys), or None if unknown."""
    keys = geo_keys(geo["tags"])
    code = keys.get(3072) or keys.get(2048)  # projected, else geographic; 32767 means user-defined
    return code if code and code != 32767 else None


def read_world_file(path):
    try:
        numbers = [float(v) for v in path.read_text().split()]
    except (OSError, ValueError):
        raise DataError(f"{path}: not a world file (six numbers, one a line)")
    if len(numbers) != 6:
        raise DataError(f"{path}: not a world file (six numbers, one a line)")
    return numbers


def geo_keys(tags):
    """GeoKeyDirectory -> {key: value} of its keys stored in the directory itself (the codes)."""
    d = tags.get(34735, (None, ()))[1]
    return {d[i]: d[i + 3] for i in range(4, 4 + 4 * d[3], 4) if d[i + 1] == 0} if len(d) >= 4 else {}


def world_from_tags(tags):
    """GeoTIFF's raster-to-map transform -> world file numbers (pixel centres), or None."""
    if 34264 in tags:  # a 4x4 matrix, row by row: x = a i + b j + d, y = e i + f j + h
        m = tags[34264][1]
        a, b, d, e, f, h = m[0], m[1], m[3], m[4], m[5], m[7]
    elif 33550 in tags and 33922 in tags:  # pixel (i0, j0) lies at (x0, y0); y grows upwards on the map
        (sx, sy), (i0, j0, _, x0, y0) = tags[33550][1][:2], tags[33922][1][:5]
        a, b, d, e, f, h = sx, 0.0, x0 - i0 * sx, 0.0, -sy, y0 + j0 * sy
    else:
        return None
    # raster coordinates name pixel corners (PixelIsArea, the default) or pixel centres (PixelIsPoint)
    c = 0.5 if geo_keys(tags).get(1025, 1) == 1 else 0.0
    return [a, e, b, f, a * c + b * c + d, e * c + f * c + h]


def pixel_area(world, keys, size):
    """A pixel's area in m2: from a projected system in metres or feet, or from degrees at the
    scene's latitude; None when the units are unknown (a world file alone does not say)."""
    a, e, b, f, x, y = world
    area = abs(a * f - b * e)
    feet = {9002: 0.3048, 9003: 1200 / 3937}
    if keys.get(1024) == 1 and keys.get(3076, 9001) in (9001, *feet):  # projected
        return area * feet.get(keys.get(3076), 1.0) ** 2
    if keys.get(1024) == 2:  # geographic, in degrees
        lat = math.radians(y + f * size[1] / 2)
        return area * (math.pi / 180 * 6371008.8) ** 2 * math.cos(lat)
    return None
