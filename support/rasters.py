"""Rasters as the field writes them, for train.py, predict.py and label.py alike, and where they lie.

With the GIS extra (rasterio, which brings GDAL and PROJ) every image is opened through GDAL: any
format and layout GDAL reads, its bands as stored, no data as GDAL's mask says (no-data value, alpha,
mask band) and NaN, scale and offset applied, its georeference as a transform and a coordinate system.
Without it, Pillow reads what it reads faithfully, 8-bit JPEG, PNG and TIFF of 1 to 4 bands, with a
world file beside them; anything else is one line saying what the file is and how to install the extra.
Never a silently degraded read.

A scene is read whole (read_scene) or window by window (opened), so that a scene of any size can be
mapped in bounded memory. Map positions: pixel (col, row) has its centre at (col, row) in pixel
coordinates; `world` holds the six numbers of a world file (x and y pixel size and rotation, then the
map x, y of the top-left pixel's centre); `crs` is the coordinate system as WKT, or None.
"""
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin

from support.cli import DataError

GIS = "pip install -r requirements-gis.txt"  # the extra: GDAL's formats, coordinate systems, vector layers
# Pillow's guard against decompression bombs (179 MP) is lifted for the orthomosaics people map; this
# one of ours takes its place for what is read whole, with the memory check of check_size
MAX_MEGAPIXELS = float(os.environ.get("MAX_MEGAPIXELS", 2000))
PILLOW_MODES = {"L": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4, "1": 1}  # read faithfully -> bands (alpha too)
WORLD_FILES = [".wld", ".jgw", ".jpgw", ".pgw", ".pngw", ".tfw", ".tifw"]
EARTH_RADIUS = 6371008.8  # metres: the mean radius, for the area of pixels in degrees
S2_BANDS = ["B4", "B3", "B2", "B8"]  # a Sentinel-2 scene: its 10 m bands, red, green, blue, near infrared
LONLAT = "EPSG:4326"  # longitude and latitude on WGS 84, as GPS points and RFC 7946 GeoJSON hold them


def gdal():
    """rasterio (GDAL), or None where the GIS extra is not installed."""
    os.environ.setdefault("GDAL_CACHEMAX", "256")  # MB of blocks GDAL keeps read (its default: 5% of RAM)
    try:
        import rasterio
    except ImportError:
        return None
    # a picture without a place is said in our own words (georeference returns None for it)
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    return rasterio


def need_gdal(what):
    """rasterio, or one line saying that `what` needs the GIS extra."""
    rasterio = gdal()
    if rasterio is None:
        raise DataError(f"{what} needs the GIS extra (GDAL): {GIS}")
    return rasterio


# ---------------------------------------------------------------------------- a scene, whole or by windows


def read_scene(path):
    """An image -> dict: samples (H, W, bands) in the file's own type (float32 where it has a scale or
    offset), no alpha band, 0 where a float is not finite; valid (H, W) bool, False where there is no
    data, or None where every pixel has data; note: what was found, in words ('' for a plain photo);
    geo: None, or {world, crs, pixel_m2}."""
    with opened(path) as scene:
        h, w, n = scene["shape"]
        check_size(path, w, h, n, scene["itemsize"])
        samples, valid = scene["read"]((0, h), (0, w))
        if valid is not None and not valid.all():
            scene["note"] = "; ".join(filter(None, [scene["note"], f"no data: {int((~valid).sum())} pixels"]))
        return {"samples": samples, "valid": None if valid is None or valid.all() else valid,
                "note": scene["note"], "geo": scene["geo"]}


def image_info(path):
    """-> ((width, height), georeference or None), from the file's header: no pixel decoded."""
    with opened(path) as scene:
        h, w, _ = scene["shape"]
        return (w, h), scene["geo"]


@contextmanager
def opened(path):
    """with opened(path) as scene: a dict of shape (H, W, bands), itemsize, geo, note, and
    read((row0, row1), (col0, col1)) -> (samples (h, w, bands), valid (h, w) bool or None) of a window.
    Through GDAL with the extra, else Pillow."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rasterio = gdal()
    if rasterio is None:
        yield pillow_scene(path)
        return
    try:
        ds = rasterio.open(sentinel2(path, rasterio))
    except rasterio.errors.RasterioIOError as e:
        raise DataError(f"{path}: cannot read image ({str(e).splitlines()[0][:200]})")
    with ds:
        names = [ds.tags(b).get("BANDNAME") for b in range(1, ds.count + 1)]
        yield gdal_scene(path, ds, [names.index(n) + 1 for n in S2_BANDS] if "SENTINEL2" in ds.driver else [])


def gdal_scene(path, ds, bands=None):
    """The scene dict of `opened` for a dataset GDAL has opened: its `bands` (counted from 1), or every
    band but alpha."""
    from rasterio._err import CPLE_BaseError
    from rasterio.enums import ColorInterp
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    alpha = [i + 1 for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha]
    bands = bands or [i for i in range(1, ds.count + 1) if i not in alpha]
    if not bands:
        raise DataError(f"{path}: holds an alpha band and no other")
    scale, offset = (np.array(v)[np.array(bands) - 1] for v in (ds.scales, ds.offsets))
    scaled = bool((scale != 1).any() or (offset != 0).any())
    masked = any(f.name != "all_valid" for f in ds.mask_flag_enums[0]) or bool(alpha)
    kind, palette = np.dtype(ds.dtypes[bands[0] - 1]), None
    if len(bands) == 1 and ds.colorinterp[bands[0] - 1] == ColorInterp.palette:  # indices: what they show
        table = ds.colormap(bands[0])
        palette = np.array([table.get(i, (0, 0, 0))[:3] for i in range(np.iinfo(kind).max + 1)], np.uint8)
    notes = []
    if (ds.count != 3 or kind != np.uint8) and palette is None:
        notes.append(f"{len(bands)} band(s) of {kind}{' and alpha' if alpha else ''}{', scaled' * scaled}")
    geo = georeference(path, ds)
    if geo is None and (ds.gcps[0] or ds.rpcs):
        how, by = ("-tps", "ground control points") if ds.gcps[0] else ("-rpc", "RPCs")
        notes.append(f"placed by {by} only, not a geotransform: mapped as a picture (gdalwarp {how} -t_srs "
                     f"EPSG:NNNN {path.name} warped.tif puts it on the map)")

    def read(rows, cols):
        window = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
        try:
            samples = np.moveaxis(ds.read(bands, window=window), 0, -1)  # (h, w, bands)
            valid = ds.dataset_mask(window=window) > 0 if masked else None
        except (RasterioError, CPLE_BaseError) as e:  # a damaged file: what GDAL says of it
            raise DataError(f"{path}: cannot read image ({str(e).splitlines()[0][:200]})")
        if palette is not None:
            samples = palette[samples[..., 0]]
        if scaled:
            samples = samples * scale.astype(np.float32) + offset.astype(np.float32)
        if samples.dtype.kind == "f":
            finite = np.isfinite(samples)
            if not finite.all():
                valid = finite.all(-1) if valid is None else valid & finite.all(-1)
                samples[~finite] = 0
        return np.ascontiguousarray(samples), valid

    n = 3 if palette is not None else len(bands)
    kind = np.dtype(np.uint8) if palette is not None else np.dtype(np.float32) if scaled else kind
    return {"shape": (ds.height, ds.width, n), "dtype": kind, "itemsize": kind.itemsize, "geo": geo,
            "note": "; ".join(notes), "read": read}


def sentinel2(path, rasterio):
    """A Sentinel-2 product as delivered (its .SAFE folder, or the MTD_MSI*.xml in it) -> GDAL's name
    of its 10 m bands as one scene (opened reads S2_BANDS of it); any other path as it is."""
    if path.is_dir():
        found = sorted(path.glob("MTD_MSI*.xml"))
        if not found:
            raise DataError(f"{path}: a folder, not an image (a Sentinel-2 .SAFE holds an MTD_MSI*.xml)")
        path = found[0]
    if not path.name.upper().startswith("MTD_MSI"):
        return path
    with rasterio.open(path) as ds:
        tens = [name for name in ds.subdatasets if ":10m:" in name]
    if not tens:
        raise DataError(f"{path}: a Sentinel-2 product without 10 m bands")
    return tens[0]


def pillow_scene(path):
    """The scene dict of `opened` without GDAL: what Pillow reads faithfully, or one line saying what
    the file is and how to read it."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        tags = tiff_tags(path)
        if tags is not None and describe_tiff(tags):  # what Pillow would read cut down, or not at all
            raise DataError(f"{path}: {describe_tiff(tags)}, read through GDAL only: {GIS}")
        with Image.open(path) as im:
            what = describe(path, im)
            if what or im.mode not in PILLOW_MODES:
                what = what or f"a {im.format} image of mode {im.mode}"
                raise DataError(f"{path}: {what}, read through GDAL only: {GIS}")
            check_size(path, *im.size, PILLOW_MODES[im.mode], 1)
            samples = np.asarray(im.convert({"P": "RGB", "1": "L"}.get(im.mode, im.mode)))
            tiff = im.format == "TIFF" and any(k in im.tag_v2 for k in (33550, 33922, 34264))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image with Pillow ({e}); GDAL reads more formats: {GIS}")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    samples = samples[..., None] if samples.ndim == 2 else samples
    alpha = samples.shape[2] in (2, 4)
    valid = samples[..., -1] > 0 if alpha else None
    samples = np.ascontiguousarray(samples[..., :-1] if alpha else samples)
    found = sidecar(path, WORLD_FILES)
    world = read_world_file(found) if found else None
    notes = [f"{samples.shape[2]} band(s) of uint8"] if samples.shape[2] != 3 else []
    if tiff and world is None:
        notes.append(f"its GeoTIFF georeference is read with the GIS extra ({GIS}); mapped as a picture")
    if world and sidecar(path, [".prj"]):
        notes.append(f"its .prj (coordinate system) is read with the GIS extra ({GIS}): no areas, no GeoJSON")
    def read(rows, cols):
        window = slice(*rows), slice(*cols)
        return samples[window], None if valid is None else valid[window]

    return {"shape": samples.shape, "dtype": samples.dtype, "itemsize": 1, "note": "; ".join(notes),
            "geo": {"world": world, "crs": None, "pixel_m2": None} if world else None, "read": read}


def describe(path, im):
    """What a file is, when Pillow would not read it faithfully (more than 8 bits a sample or more than 4
    bands): e.g. '16-bit RGB PNG', 'TIFF of 13 float32 bands'; '' when it reads it as it is."""
    if im.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(26)  # the signature, then IHDR: width, height, bit depth, colour type
        bits, colour = header[24], header[25]
        kind = {0: "grey", 2: "RGB", 3: "palette", 4: "grey and alpha", 6: "RGBA"}.get(colour, "")
        return f"{bits}-bit {kind} PNG" if bits > 8 else ""
    return ""


def tiff_tags(path):
    """The tags of a TIFF's first image, read by Pillow's parser alone (Pillow opens fewer layouts than
    its parser reads), or None for any other file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] not in (b"II*\0", b"MM\0*"):
            return None
        tags = TiffImagePlugin.ImageFileDirectory_v2(head)
        f.seek(tags.next)
        tags.load(f)
    return tags


def describe_tiff(tags):
    """A TIFF that Pillow would not read faithfully, in words ('GeoTIFF of 13 float32 bands'), or '': more
    than 8 bits a sample, more than 4 bands, or a band after the colours that is not alpha (a near
    infrared, which Pillow drops or takes for alpha)."""
    bits, n = tags.get(258, (8,))[0], tags.get(277, 1)
    kind = {1: "uint", 2: "int", 3: "float"}.get(tags.get(339, (1,))[0], "")
    extra = tags.get(338, ())
    extra = extra if isinstance(extra, tuple) else (extra,)
    geo = "GeoTIFF" if any(k in tags for k in (33550, 33922, 34264)) else "TIFF"
    other = any(e not in (1, 2) for e in extra)  # 1, 2: alpha
    plain = bits == 8 and kind == "uint" and n <= 4 and not other
    return "" if plain else f"{geo} of {n} {kind}{bits} band(s)" + ", the last no alpha" * other


def check_size(path, w, h, bands, itemsize, held=None):
    """Refuse, before anything is read whole, a size past MAX_MEGAPIXELS, more pixels than the file's
    bytes can hold, or more than the memory this machine has free: a damaged or hostile header claims
    billions of pixels in a few bytes. held: the bytes a pixel takes in memory (default: the image read
    whole, a copy, and the map's arrays)."""
    if min(w, h, bands) < 1:
        raise DataError(f"{path}: its header says {w}x{h} pixels of {bands} band(s): no pixels to read")
    if w * h > MAX_MEGAPIXELS * 1e6:
        raise DataError(f"{path}: {w}x{h} pixels ({w * h / 1e6:.0f} MP) is past the limit of "
                        f"{MAX_MEGAPIXELS:g} MP for an image held in memory whole (training images, the "
                        f"click page, a picture's map); to read it, set MAX_MEGAPIXELS={w * h // 10**6 + 1}")
    stored, size = w * h * bands * itemsize, file_size(path)
    if size and stored > 3000 * size:  # deflate packs 1032 bytes in one at best, LZW about 2700, JPEG fewer
        raise DataError(f"{path}: damaged or hostile header: {w}x{h} pixels of {bands} band(s) cannot come "
                        f"out of {size} bytes")
    need = w * h * (held or 2 * bands * itemsize + 12)  # decoded, a copy, then the map's arrays
    free = free_memory()
    if free is not None and need > free:
        raise DataError(f"{path}: {w}x{h} pixels of {bands} band(s) need about {need / 1e6:,.0f} MB of "
                        f"memory, this machine has {free / 1e6:,.0f} MB free")


def file_size(path):
    """Bytes of a file, or of every file of a folder (a .SAFE product); 0 where they cannot be told."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def free_memory():
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------- where a scene lies


def georeference(path, ds):
    """-> None for a picture, or {world, crs (WKT or None), pixel_m2}: GDAL's geotransform and
    coordinate system; a .prj beside the image (ArcGIS writes one, GDAL does not read it) where GDAL
    found none. pixel_m2: one pixel's area in square metres, one number, or one per row in degrees;
    None where the units are unknown."""
    t = ds.transform
    if ds.crs is None and t.is_identity:
        return None
    crs = ds.crs
    prj = sidecar(path, [".prj"]) if crs is None else None
    if prj is not None:
        from rasterio.crs import CRS

        try:
            crs = CRS.from_wkt(prj.read_text(errors="replace"), morph_from_esri_dialect=True)
        except Exception as e:  # rasterio's CRSError, from whatever PROJ refuses
            raise DataError(f"{prj}: not a coordinate system GDAL reads ({e})")
    world = [t.a, t.d, t.b, t.e, t.c + t.a / 2 + t.b / 2, t.f + t.d / 2 + t.e / 2]  # at pixel centres
    return {"world": world, "crs": crs and crs.to_wkt(), "pixel_m2": pixel_area(world, crs, ds.height)}


def pixel_area(world, crs, rows):
    """A pixel's area in m2: one number in a projected system; in degrees, one per row, each on the
    sphere of the Earth's mean radius between its row's edges (rows nearer the poles are smaller)."""
    if crs is None:
        return None
    a, d, b, e, c, f = world
    if crs.is_projected:
        return abs(a * e - b * d) * crs.linear_units_factor[1] ** 2
    lat = [f + e * j for j in range(rows)]  # the latitude of each row's centre (north-up)
    strip = EARTH_RADIUS**2 * math.radians(abs(a))
    return [strip * abs(math.sin(math.radians(r + e / 2)) - math.sin(math.radians(r - e / 2))) for r in lat]


def map_to_pixel(world, x, y):
    """Map coordinates -> (column, row) in pixels, whole numbers at pixel centres."""
    a, d, b, e, c, f = world
    det = a * e - b * d
    return (e * (x - c) - b * (y - f)) / det, (a * (y - f) - d * (x - c)) / det


def pixel_to_map(world, col, row):
    a, d, b, e, c, f = world
    return a * col + b * row + c, d * col + e * row + f


def reproject(source, target, xs, ys, what):
    """Points from one coordinate system to another (any GDAL reads: EPSG:NNNN, WKT, a PROJ string),
    with GDAL's transforms (PROJ) -> (xs, ys)."""
    need_gdal(f"{what}: moving positions from one coordinate system to another")
    from rasterio._err import CPLE_BaseError  # what PROJ says of positions it cannot move
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    try:
        return transform(source, target, list(xs), list(ys))
    except (CRSError, CPLE_BaseError, ValueError) as e:
        raise DataError(f"{what}: cannot move its positions onto the images ({e})")


def same_crs(a, b):
    """Whether two coordinate systems (EPSG:NNNN, WKT...) are one, as GDAL compares them."""
    from rasterio.crs import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


def read_world_file(path):
    try:
        numbers = [float(v) for v in path.read_text().split()]
    except (OSError, ValueError):
        numbers = []
    if len(numbers) != 6:
        raise DataError(f"{path}: not a world file (six numbers, one a line)")
    return numbers


def sidecar(path, suffixes):
    """The first file beside `path` named with one of `suffixes` in place of its own, whatever the case
    of either name (cameras and Windows tools write upper case); None if there is none."""
    try:
        beside = {p.name.lower(): p for p in sorted(path.parent.iterdir(), reverse=True)}
    except OSError:
        return None
    return next((beside[n] for n in ((path.stem + s).lower() for s in suffixes) if n in beside), None)
