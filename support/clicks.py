"""Clicks and drawn labels as users make them, read and written: a CSV of pixels (image,x,y,class) as
the page or a spreadsheet writes it, with strokes and polygons as runs of rows; a CSV of map coordinates
(lon,lat,class); or a layer of points, lines and polygons in map coordinates, as QGIS saves one: GeoJSON,
and with the GIS extra GeoPackage, shapefile, KML, FlatGeobuf, GeoJSONSeq (layers.py reads them); labels in
another coordinate system than the images' are moved onto them. Shapes become the pixels they cover
(shapes.py). Out: the points a run trained on, suggested next clicks.
"""
import csv
import io
import json
import math
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np

from support import layers, rasters, shapes
from support.rasters import LONLAT
from support.cli import DataError, written

CLASS_FIELDS = ["class", "class_name", "label", "class_id"]  # where a click's class is looked for
DRAWN = ["stroke", "polygon"]  # CSV columns whose values tie consecutive rows into one line or ring


def read_clicks(paths, info, class_names=None, field=None, crs=None, line_width=3):
    """Click files -> ({image name: [(x, y, class index)]}, class names): a point is one pixel, a line or
    a polygon every pixel it labels, drawn `line_width` pixels wide or filled (shapes.py).

    info: {image name: ((width, height), georeferencing or None)} for every image of the data set.
    class_names: those of classes.json, or None to take the names found in the clicks, sorted. A
    class is a name, or an index into classes.json. Clicks with an empty class are skipped. crs: the
    coordinate system of a CSV's x and y when they are map coordinates (--points-crs).
    """
    rows = []  # (where, image name, x, y, class as written)
    for path in paths:
        if layers.is_layer(path):
            rows += read_layer(path, info, field, line_width)
        else:
            rows += read_csv(path, info, field, crs, line_width)
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no click on an image of the data set")
    return classify(rows, class_names)


def classify(rows, class_names=None):
    """Rows (where, image name, x, y, class as written) -> ({image name: [(x, y, class index)]},
    class names: those given, or the names found in the rows, sorted)."""
    empty = len({r[0] for r in rows if r[4] == ""})  # a shape's pixels share their `where`
    if empty:
        print(f"{empty} label(s) have no class yet (suggestions to fill in?) and are skipped")
    if all(r[4] == "" for r in rows):
        raise DataError(f"{rows[0][0]}: no click has a class yet (every class is left empty)")
    rows = [r for r in rows if r[4] != ""]
    named = class_names is not None
    class_names = class_names or sorted({r[4] for r in rows})
    index = {n: i for i, n in enumerate(class_names)}
    by_image = {}
    for where, image, x, y, value in rows:
        c = index.get(value, int(value) if named and value.isdigit() else None)
        if c is None or c >= len(class_names):
            raise DataError(f"{where}: class {value!r} is not in classes.json ({', '.join(class_names)})")
        by_image.setdefault(image, []).append((x, y, c))
    return by_image, class_names


def class_of(record, field, where):
    """The class written in a CSV row or a feature's properties, as text ('' when left empty)."""
    for f in [field] if field else CLASS_FIELDS:
        if f in record:
            value = record[f]
            value = int(value) if isinstance(value, float) and value.is_integer() else value
            return "" if value is None else str(value).strip()
    fields = field or " or ".join(CLASS_FIELDS)
    raise DataError(f"{where}: no class ({fields}{'' if field else '; --class-field names another'})")


# a field may be long (a WKT polygon passes csv's default limit of 131,072 characters): read it whole
csv.field_size_limit(2**31 - 1)


def read_table(path):
    """A CSV as programs write it -> (rows as dicts with lower-case column names, its separator): UTF-8
    with or without a byte-order mark (Excel's "CSV UTF-8"), or UTF-16 (Excel's "Unicode text"); commas,
    semicolons (Excel in many languages, where the comma is the decimal mark) or tabs."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode(encoding(raw))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as text ({getattr(e, 'strerror', None) or e})")
    sep = separator(text)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    reader.fieldnames = [f.strip().lower() for f in reader.fieldnames or []]
    return [{k: as_written(v) for k, v in r.items()} for r in reader], sep


FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes as the start of a formula


def text_cell(value):
    """A text cell (an image or class name) as a CSV must hold it for spreadsheets to show it as text: a
    name that begins like a formula (a class named =HYPERLINK(...)) is written after a single quote, as
    spreadsheets mark text themselves. read_table takes the quote off again."""
    value = str(value)
    return "'" + value if value.startswith(FORMULA) else value


def as_written(value):
    """A cell as read -> the text written, without the quote text_cell puts before a formula's start."""
    quoted = isinstance(value, str) and value[:1] == "'" and value[1:].startswith(FORMULA)
    return value[1:] if quoted else value


def encoding(raw):
    """The encoding of a text file's bytes, by its byte-order mark: UTF-16, UTF-8 with one, or UTF-8."""
    return ("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else
            "utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8")


def separator(text):
    """The separator of a CSV: whichever of ',', ';' and tab its first line holds most."""
    return max([",", ";", "\t"], key=text.split("\n", 1)[0].count)


def read_csv(path, info, field=None, crs=None, line_width=3):
    """image,x,y,class with x, y in whole pixels from the top-left; or lon,lat,class (GPS), or x,y,class
    in the map coordinates of `crs`, with no image column -> rows for read_clicks. In a pixel CSV, rows
    with the same value in a `stroke` (or `polygon`) column, one after the other, are the positions of
    one line drawn `line_width` wide (or of one ring, closed by itself); their x, y may have decimals."""
    records, sep = read_table(path)
    columns, field = set(records[0]) if records else set(), field and field.lower()
    if "image" not in columns and ({"lon", "lat"} <= columns or crs):
        x, y = ("lon", "lat") if {"lon", "lat"} <= columns else ("x", "y")
        points = [(f"{path}:{line}", number(r.get(x), sep), number(r.get(y), sep), r)
                  for line, r in enumerate(records, start=2)]
        points = [(where, px, py, class_of(r, field, where)) for where, px, py, r in points]
        return place(points, info, LONLAT if x == "lon" else crs, path)
    find, rows, drawn, last = image_finder(info), [], [], None  # drawn: [(column, [its rows])]
    for line, record in enumerate(records, start=2):
        where = f"{path}:{line}"
        ties = [(c, record[c].strip()) for c in DRAWN if (record.get(c) or "").strip()]
        if len(ties) > 1:
            raise DataError(f"{where}: a row of a stroke and of a polygon at once")
        try:
            image = record["image"]
            x, y = (number(record["x"], sep), number(record["y"], sep)) if ties else \
                (whole(record["x"]), whole(record["y"]))
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(x)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: expected columns image,x,y,class with whole numbers x and y (or "
                            "lon,lat,class; or x,y,class with --points-crs)")
        name, value = find(image, where), class_of(record, field, where)
        if ties:  # a position of a stroke or polygon, with the rows before it of the same one
            if ties[0] != last:
                drawn.append((ties[0][0], []))
            drawn[-1][1].append((where, name, x, y, value))
            last = ties[0]
            continue
        last = None
        (w, h), _ = info[name]
        if not (0 <= x < w and 0 <= y < h):
            raise DataError(f"{where}: point ({x}, {y}) is outside {name} ({w}x{h})")
        rows.append((where, name, x, y, value))
    for kind, positions in drawn:
        rows += shapes.drawn_rows(kind, positions, info, line_width)
    return rows


def whole(text):
    """'12' or '12.0' (a spreadsheet's number) -> 12; anything else is a ValueError."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def number(text, sep):
    try:
        value = float(text.replace(",", ".") if sep == ";" else text)  # 55,27: a decimal comma
    except (AttributeError, ValueError):
        value = math.nan
    return value


def image_finder(info):
    """-> find(path as written, where) -> image name. The path may be relative to the data set, or
    longer (an absolute path) or shorter (a file name), as long as it names one image."""
    suffixes = {}
    for name in info:
        parts = PurePosixPath(unicodedata.normalize("NFC", name)).parts
        for k in range(1, len(parts) + 1):
            suffixes.setdefault("/".join(parts[-k:]), []).append(name)

    def find(written, where):
        # any Unicode form: macOS's file system keeps names decomposed (NFD), spreadsheets write them composed
        parts = PurePosixPath(unicodedata.normalize("NFC", str(written)).replace("\\", "/")).parts
        for k in range(len(parts), 0, -1):
            names = suffixes.get("/".join(parts[-k:]), [])
            if len(names) == 1:
                return names[0]
            if names:
                some = ", ".join(names[:3])
                raise DataError(f"{where}: image {written!r} could be any of {some}: give its path from the "
                                "data set's folder")
        raise DataError(f"{where}: unknown image {written!r} (not in the data set)")

    return find


def read_layer(path, info, field=None, line_width=3):
    """A layer of Points, LineStrings, Polygons (and their Multi- kinds) in map coordinates -> rows for
    read_clicks. Without a coordinate system, the images' system, or RFC 7946's longitude and latitude
    where no position lies on an image but all lie within +-180, +-90."""
    features, crs, fields = layers.read_features(path)
    if fields is not None:
        check_fields(fields, field, path)
    points, drawn = [], []
    for where, kind, coords, properties in features:
        if kind not in ("Point", "MultiPoint", *shapes.KINDS):
            what = f"a {kind}" if kind else "no geometry"
            raise DataError(f"{where}: {what}, not a Point, LineString or Polygon (nor a Multi- of them)")
        value = class_of(properties, field, where)
        if kind not in ("Point", "MultiPoint"):
            drawn.append((where, kind, shapes.check_geometry(kind, coords, where), value))
            continue
        for point in [coords] if kind == "Point" else coords if isinstance(coords, (list, tuple)) else [None]:
            try:
                x, y = float(point[0]), float(point[1])
            except (TypeError, ValueError, IndexError):
                raise DataError(f"{where}: coordinates {point!r} are not a pair of numbers")
            points.append((where, x, y, value))
    xy = [(x, y) for _, x, y, _ in points] + [v for d in drawn for v in np.vstack(sum(d[2], []))]  # vertices
    if crs is None and xy and all(abs(x) <= 180 and abs(y) <= 90 for x, y in xy) and \
            not any(on_images(info, x, y) for x, y in xy):
        print(f"{path}: no coordinate system, and its positions lie on no image but within longitude and "
              "latitude: read as RFC 7946 GeoJSON, longitude and latitude on WGS 84")
        crs = LONLAT
    rows = place(points, info, crs, path) if points else []
    return rows + place_shapes(drawn, info, crs, path, line_width)


def check_fields(fields, field, path):
    """A layer with no field for the class is one line naming the fields it has."""
    wanted = [field] if field else CLASS_FIELDS
    if not set(wanted) & set(fields):
        has = ", ".join(fields) or "none"
        raise DataError(f"{path}: no field {' or '.join(wanted)} for the class (its fields: {has})"
                        f"{'' if field else '; --class-field names one'}")


def on_images(info, x, y):
    return any(geo and locate([(n, size, geo["world"])], x, y) for n, (size, geo) in info.items())


def georeferenced(info, path):
    """{image name: ((w, h), georeferencing)} of the images placed on the map; none is one line."""
    placed = {n: (size, geo) for n, (size, geo) in info.items() if geo}
    if not placed:
        raise DataError(f"{path}: labels in map coordinates, but no image of the data set is georeferenced "
                        f"(a world file, or through GDAL a GeoTIFF or any raster it places: {rasters.GIS})")
    return placed


def onto(geo, crs, xy, path):
    """Map positions in `crs` (None: the images' own) -> the same in the image's system. An image whose
    system is not known (a world file alone) is taken to be in the labels' system."""
    if crs is None or geo["crs"] is None and rasters.gdal() is not None:
        return xy
    if geo["crs"] is None:  # without GDAL no image's system is known
        raise DataError(f"{path}: its positions are in {crs}: placing them on the images needs the GIS extra "
                        f"(GDAL and PROJ): {rasters.GIS}")
    if rasters.same_crs(crs, geo["crs"]):
        return xy
    return list(zip(*rasters.reproject(crs, geo["crs"], [p[0] for p in xy], [p[1] for p in xy], path)))


def place(points, info, crs, path):
    """[(where, x, y, class)] in map coordinates of `crs` (None: the images' own) -> rows for read_clicks:
    each point on the first image whose pixels hold it, moved into that image's system where it differs;
    points on no image are counted in one line."""
    moved = {}  # image name -> its points in its own system
    for name, (size, geo) in georeferenced(info, path).items():
        moved[name] = (size, geo["world"], onto(geo, crs, [(x, y) for _, x, y, _ in points], path))
    rows, off = [], 0
    for k, (where, x, y, value) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise DataError(f"{where}: coordinates ({x}, {y}) are not finite numbers")
        hits = (locate([(n, size, world)], *xy[k]) for n, (size, world, xy) in moved.items())
        hit = next((h for h in hits if h), None)
        if hit is None:
            off += 1
        else:
            rows.append((where, *hit, value))
    if off:
        print(f"{path}: {off} point(s) lie on no image and are skipped")
    return rows


def place_shapes(drawn, info, crs, path, line_width):
    """[(where, GeoJSON kind, parts, class)] in map coordinates of `crs` -> rows for read_clicks: a row
    for each pixel a shape labels on each image it lies on, clipped to it; a shape on no image is one
    line. The vertices are moved onto each image, and joined by straight lines there."""
    pieces, rows, covered = [p for _, _, parts, _ in drawn for p in parts], [], set()
    for name, (size, geo) in georeferenced(info, path).items() if drawn else []:
        def move(xy):  # (N, 2) map positions -> (N, 2) columns and rows of this image
            xy = np.array(onto(geo, crs, xy, path), float)
            return np.stack(rasters.map_to_pixel(geo["world"], xy[:, 0], xy[:, 1]), axis=1)
        on_image = iter(shapes.moved(pieces, move))
        for where, kind, parts, value in drawn:
            cols, rws = shapes.pixels(kind, [next(on_image) for _ in parts], size, line_width)
            rows += [(where, name, c, r, value) for c, r in zip(cols.tolist(), rws.tolist())]
            covered |= {where} if len(cols) else set()
    for where, kind, _, _ in drawn:
        if where not in covered:
            raise DataError(f"{where}: the {kind} covers no pixel of any image")
    return rows


def locate(placed, x, y):
    """Map point -> (image name, column, row) of the first image whose pixels hold it, or None."""
    for name, (w, h), world in placed:
        col, row = rasters.map_to_pixel(world, x, y)
        if not (math.isfinite(col) and math.isfinite(row)):
            continue
        i, j = math.floor(col + 0.5), math.floor(row + 0.5)  # pixel i spans i - 0.5 .. i + 0.5
        if 0 <= i < w and 0 <= j < h:
            return name, i, j
    return None


def filled_in(path):
    """How many rows or features of a suggestions file have a class filled in (0 if there is no file)."""
    if not Path(path).exists():
        return 0
    try:
        if layers.is_layer(path):
            features = json.loads(Path(path).read_text(encoding="utf-8-sig")).get("features", [])
            return sum(bool(str((f.get("properties") or {}).get("class") or "").strip()) for f in features)
        return sum(bool((r.get("class") or "").strip()) for r in read_table(path)[0])
    except (ValueError, AttributeError, TypeError, DataError):
        raise DataError(f"{path}: cannot be read to see whether a person has filled it in: move it away")


# ---------------------------------------------------------------------------- writing


def write_points(path, points, names):
    """The points a run trains on -> CSV image,x,y,class (class as its index)."""
    with written(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class"])
        w.writerows([text_cell(names[i]), x, y, c] for i, x, y, c in points)


def write_suggestions(folder, rows, class_names, geos):
    """Suggested clicks -> suggestions.csv, and suggestions.geojson when images are georeferenced.

    rows: (image as given, x, y, predicted class, margin). The class is left empty for a person to
    fill in, with the model's guess beside it as `hint`: --point-labels skips clicks without one. The
    margin in 2 significant digits: a suggestion sits on a class boundary, where it is near 0 (3.1e-05),
    and 0 is a tie (bf16 logits round two classes to one value), which 4 decimals would not tell apart.
    """
    folder = Path(folder)
    paths = [folder / "suggestions.csv"]
    with written(paths[0]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class", "hint", "margin"])
        w.writerows([text_cell(image), x, y, "", text_cell(class_names[c]), f"{m:.2g}"]
                    for image, x, y, c, m in rows)
    points = [(image, x, y, {"image": image, "x": x, "y": y, "class": "", "hint": class_names[c],
                              "margin": float(f"{m:.2g}")}) for image, x, y, c, m in rows]
    path = write_points_geojson(folder / "suggestions.geojson", points, geos)
    return paths + [path] * (path is not None)


def write_points_geojson(path, points, geos):
    """[(image, x, y, properties)] -> a GeoJSON of the points as RFC 7946 wants it, longitude and latitude
    on WGS 84 with no crs member, so that any mix of scenes and systems lands right in QGIS; the points of
    images whose system is not known (none is without GDAL) are left out, in one line. -> path, or None
    where no point could be placed."""
    features, left = [], []
    for image in dict.fromkeys(p[0] for p in points):  # each image once, in order
        mine, geo = [p for p in points if p[0] == image], geos.get(image)
        if not geo or not geo["crs"] or rasters.gdal() is None:
            left.append(str(image))
            continue
        xs, ys = zip(*(rasters.pixel_to_map(geo["world"], x, y) for _, x, y, _ in mine))
        lons, lats = rasters.reproject(geo["crs"], LONLAT, xs, ys, image)
        features += [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]},
                      "properties": properties} for lon, lat, (*_, properties) in zip(lons, lats, mine)]
    if left:
        some = ", ".join(left[:5]) + " ..." * (len(left) > 5)
        print(f"{path.name}: leaves out {some}: no coordinate system known"
              f"{'' if rasters.gdal() else f' (GIS extra: {rasters.GIS})'}")
    if not features:
        return None
    with written(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1))
    return path
