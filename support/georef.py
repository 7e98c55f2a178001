"""Where a scene lies on the map: GeoTIFF tags, a world file or GDAL's .aux.xml beside the image, its
coordinate reference system (GeoKeys, .prj), pixel <-> map coordinates, and the area of its pixels.
Sidecar files are found whatever the case of their names (cameras and Windows tools write upper case).
"""
import functools
import math
import os
import re
import time
import xml.etree.ElementTree as ET

from support.cli import DataError

# the GeoTIFF tags that place a raster on the map: pixel size, tie point, or an affine transform;
# the coordinate reference system is in the three GeoKey tags
GEO_TAGS = [33550, 33922, 34264, 34735, 34736, 34737]
WORLD_FILES = [".tfw", ".tifw", ".jgw", ".jpgw", ".pgw", ".pngw", ".wld"]  # beside an image: its world file
EARTH_RADIUS = 6371008.8  # metres: the mean radius, for areas on a sphere


def sidecar(path, suffix, replace=True):
    """The file beside `path` named with `suffix` (in place of its own, or after its name when not
    `replace`: scene.tif.msk), whatever the case of either name; None if there is none."""
    name = path.stem + suffix if replace else path.name + suffix
    try:
        changed = path.parent.stat().st_mtime_ns
    except OSError:
        return None
    if time.time_ns() - changed < 2e9:  # changed just now, within the clock's coarse steps: list it again
        changed = time.time_ns()
    names = files_in(path.parent, changed)
    return names.get(name) or names.get(name.lower())


@functools.lru_cache(maxsize=16)
def files_in(folder, changed):
    """{name and lower-case name: path} of the files of a folder, listed once while it does not change
    (`changed`, its modification time): a folder of thousands of images is not listed for each."""
    names = {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_file():
                names.setdefault(entry.name.lower(), folder / entry.name)
                names[entry.name] = folder / entry.name
    return names


def aux_xml(path):
    """GDAL's .aux.xml beside an image (where GDAL keeps what a JPEG or PNG cannot hold) -> dict with
    any of: nodata (band 1's no-data value), world (from its GeoTransform), crs (its SRS, as WKT)."""
    found = sidecar(path, ".aux.xml", replace=False)
    if found is None:
        return {}
    try:
        root = ET.parse(found).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{found}: not GDAL's XML ({e})")
    out = {}
    value = root.findtext("PAMRasterBand[@band='1']/NoDataValue")
    if value is not None:
        out["nodata"] = float(value)
    numbers = [float(v) for v in (root.findtext("GeoTransform") or "").replace(",", " ").split()]
    if len(numbers) == 6:  # x = c + a col + b row, y = f + d col + e row, at pixel corners
        c, a, b, f, d, e = numbers
        out["world"] = [a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2]
    if (root.findtext("SRS") or "").strip():
        out["crs"] = root.findtext("SRS").strip()
    return out


def georeference(path, tags, size):
    """-> None, or dict: tags (GeoTIFF tag -> (type, value)), world (the six numbers of a world
    file: x and y pixel size and rotation, then the map x, y of the top-left pixel's centre), prj
    (a .prj file beside the image), crs (EPSG:NNNN or WKT, None if unknown), pixel_m2 (each row's
    pixel area in square metres: one number, or one per row in degrees; None if the units are unknown)."""
    tags = {k: (tags.tagtype[k], tags[k]) for k in GEO_TAGS if k in tags}
    aux = aux_xml(path)
    world = world_from_tags(tags)  # the file's own tags first, then a world file beside it, then GDAL's
    if world is None:
        found = next((p for p in map(lambda s: sidecar(path, s), WORLD_FILES) if p), None)
        world = read_world_file(found) if found else aux.get("world")
    if world is None:
        return None
    prj = sidecar(path, ".prj")
    keys = geo_keys(tags)
    code = keys.get(3072) or keys.get(2048)  # projected, else geographic; 32767 means user-defined
    wkt = prj.read_text(errors="replace") if prj else aux.get("crs")
    named = re.search(r'AUTHORITY\["EPSG",\s*"(\d+)"\]\]\s*$', wkt or "")  # the code of the whole system
    crs = f"EPSG:{code}" if code and code != 32767 else f"EPSG:{named.group(1)}" if named else wkt
    return {"tags": tags, "world": world, "prj": prj, "crs": crs,
            "pixel_m2": pixel_area(world, keys, wkt, size)}


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
    found = re.fullmatch(r"EPSG:(\d+)", str(geo.get("crs")))
    return int(found.group(1)) if found else None


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


def pixel_area(world, keys, wkt, size):
    """A pixel's area in m2: one number in a projected system in metres or feet; in degrees, one per
    row, each on the sphere of the Earth's mean radius between its row's edges (rows nearer the poles
    are smaller); None when the units are unknown (a world file alone does not say)."""
    a, e, b, f, x, y = world
    feet = {9002: 0.3048, 9003: 1200 / 3937}
    unit = None  # metres per unit of a projected system, or "degree"
    if keys.get(1024) == 1 and keys.get(3076, 9001) in (9001, *feet):  # GeoKeys: projected
        unit = feet.get(keys.get(3076), 1.0)
    elif keys.get(1024) == 2:  # GeoKeys: geographic
        unit = "degree"
    elif wkt and re.match(r"\s*PROJ(CS|CRS)\[", wkt):  # a .prj: its last unit is the projection's
        found = re.findall(r'UNIT\["([^"]+)",\s*([0-9.eE+-]+)', wkt)
        if found and found[-1][0].lower() in ("metre", "meter", "foot", "us survey foot", "foot_us"):
            unit = float(found[-1][1])
    elif wkt and re.match(r"\s*GEOG(CS|CRS)\[", wkt):
        unit = "degree"
    if unit is None:
        return None
    if unit != "degree":
        return abs(a * f - b * e) * unit**2
    rows = [y + f * j for j in range(size[1])]  # the latitude of each row's centre (north-up)
    strip = EARTH_RADIUS**2 * math.radians(abs(a))
    return [strip * abs(math.sin(math.radians(r + f / 2)) - math.sin(math.radians(r - f / 2))) for r in rows]
