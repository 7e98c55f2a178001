"""Clicks as users make them, read and written: a CSV of pixels (image,x,y,class), or a GeoJSON
FeatureCollection of points in the map coordinates of georeferenced images, as QGIS exports a point
layer. Out: the points a run trained on, and suggested next clicks for a person to fill in.
"""
import csv
import json
import math
import re
from pathlib import Path, PurePosixPath

import scene
from cli import DataError

CLASS_FIELDS = ["class", "class_name", "label", "class_id"]  # where a click's class is looked for


def read_clicks(paths, info, class_names=None, field=None):
    """Click files -> ({image name: [(x, y, class index)]}, class names).

    info: {image name: ((width, height), georeferencing or None)} for every image of the data set.
    class_names: those of classes.json, or None to take the names found in the clicks, sorted. A
    class is a name, or an index into classes.json. Clicks with an empty class are skipped.
    """
    rows = []  # (where, image name, x, y, class as written)
    for path in map(Path, paths):
        geojson = path.suffix.lower() in (".geojson", ".json")
        rows += read_geojson(path, info, field) if geojson else read_csv(path, info, field)
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no click on an image of the data set")
    return classify(rows, class_names)


def classify(rows, class_names=None):
    """Rows (where, image name, x, y, class as written) -> ({image name: [(x, y, class index)]},
    class names: those given, or the names found in the rows, sorted)."""
    empty = sum(r[4] == "" for r in rows)
    if empty:
        print(f"{empty} click(s) have no class yet (suggestions to fill in?) and are skipped")
    if empty == len(rows):
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


def read_csv(path, info, field=None):
    """image,x,y,class with x, y in whole pixels from the top-left -> rows for read_clicks."""
    try:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
    find = image_finder(info)
    rows = []
    for line, record in enumerate(records, start=2):
        where = f"{path}:{line}"
        try:
            image, x, y = record["image"], int(record["x"]), int(record["y"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: expected columns image,x,y,class with whole numbers x and y")
        name = find(image, where)
        (w, h), _ = info[name]
        if not (0 <= x < w and 0 <= y < h):
            raise DataError(f"{where}: point ({x}, {y}) is outside {name} ({w}x{h})")
        rows.append((where, name, x, y, class_of(record, field, where)))
    return rows


def image_finder(info):
    """-> find(path as written, where) -> image name. The path may be relative to the data set, or
    longer (an absolute path) or shorter (a file name), as long as it names one image."""
    suffixes = {}
    for name in info:
        parts = PurePosixPath(name).parts
        for k in range(1, len(parts) + 1):
            suffixes.setdefault("/".join(parts[-k:]), []).append(name)

    def find(written, where):
        parts = PurePosixPath(written.replace("\\", "/")).parts
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


def read_geojson(path, info, field=None):
    """A FeatureCollection of Points (or MultiPoints) in map coordinates -> rows for read_clicks; each
    point goes to the first image whose footprint holds it; points on no image are counted."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    except ValueError as e:  # not JSON, or not text
        raise DataError(f"{path}: not JSON ({e})")
    features = doc.get("features") if isinstance(doc, dict) else None
    if doc.get("type") != "FeatureCollection" or not isinstance(features, list):
        raise DataError(f"{path}: not a GeoJSON FeatureCollection")
    code = crs_code(doc.get("crs"), path)
    placed = [(n, size, geo["world"]) for n, (size, geo) in info.items()
              if geo and (code is None or scene.epsg(geo) in (None, code))]
    if not placed:
        codes = sorted({scene.epsg(geo) for _, geo in info.values() if geo and scene.epsg(geo)})
        if codes:
            raise DataError(f"{path}: its crs is EPSG:{code}, the images' EPSG:{', '.join(map(str, codes))}: "
                            "reproject the points (QGIS: Export > Save Features As > CRS); this project has "
                            "no reprojection library")
        raise DataError(f"{path}: points in map coordinates, but no image of the data set is georeferenced "
                        "(GeoTIFF tags or a world file)")
    rows, off = [], 0
    for k, feature in enumerate(features):
        where = f"{path}: feature {k}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Point", "MultiPoint"):
            raise DataError(f"{where}: {'a ' + str(kind) if kind else 'no geometry'}, not a Point")
        value = class_of(feature.get("properties") or {}, field, where)
        coords = geometry.get("coordinates")
        for point in [coords] if kind == "Point" else coords or []:
            try:
                x, y = float(point[0]), float(point[1])
            except (TypeError, ValueError, IndexError):
                raise DataError(f"{where}: coordinates {point!r} are not a pair of numbers")
            hit = locate(placed, x, y)
            if hit is None:
                off += 1
            else:
                rows.append((where, *hit, value))
    if off:
        print(f"{path}: {off} point(s) lie on no image and are skipped")
    return rows


def crs_code(crs, path):
    """GeoJSON's crs member -> EPSG code, or None when there is none (the images' system is assumed)."""
    if crs is None:
        return None
    name = str(crs.get("properties", {}).get("name", "")) if isinstance(crs, dict) else ""
    if name.endswith("CRS84"):  # longitude, latitude on WGS 84
        return 4326
    found = re.search(r"EPSG:(?:[\d.]*:)?(\d+)$", name)
    if not found:
        raise DataError(f"{path}: crs {name or crs!r} is not an EPSG code")
    return int(found.group(1))


def locate(placed, x, y):
    """Map point -> (image name, column, row) of the first image whose pixels hold it, or None."""
    for name, (w, h), world in placed:
        col, row = scene.map_to_pixel(world, x, y)
        i, j = math.floor(col + 0.5), math.floor(row + 0.5)  # pixel i spans i - 0.5 .. i + 0.5
        if 0 <= i < w and 0 <= j < h:
            return name, i, j
    return None


# ---------------------------------------------------------------------------- writing


def write_points(path, points, names):
    """The points a run trains on -> CSV image,x,y,class (class as its index)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class"])
        w.writerows([names[i], x, y, c] for i, x, y, c in points)


def write_suggestions(folder, rows, class_names, geos):
    """Suggested clicks -> suggestions.csv, and suggestions.geojson when images are georeferenced.

    rows: (image as given, x, y, predicted class, margin). The class is left empty for a person to
    fill in, with the model's guess beside it as `hint`: --point-labels skips clicks without one.
    """
    folder = Path(folder)
    written = [folder / "suggestions.csv"]
    with open(written[0], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class", "hint", "margin"])
        w.writerows([image, x, y, "", class_names[c], f"{m:.4f}"] for image, x, y, c, m in rows)
    features = []
    for image, x, y, c, m in rows:
        if geos.get(image):
            mx, my = scene.pixel_to_map(geos[image]["world"], x, y)
            properties = {"image": image, "x": x, "y": y, "class": "", "hint": class_names[c],
                          "margin": round(m, 4)}
            features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [mx, my]},
                             "properties": properties})
    if features:
        doc = {"type": "FeatureCollection", "features": features}
        codes = {scene.epsg(g) for g in geos.values() if g} - {None}
        if len(codes) == 1:
            doc["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{codes.pop()}"}}
        written.append(folder / "suggestions.geojson")
        written[-1].write_text(json.dumps(doc, indent=1))
    return written
