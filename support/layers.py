"""Vector layers as the field writes them, read as features: GeoJSON with Python's json (a FeatureCollection
as QGIS exports it, a crs member naming an EPSG code), and through OGR (pyogrio, the GIS extra) every format
QGIS writes: GeoPackage, shapefile, KML, FlatGeobuf, GeoJSONSeq, and GeoJSON past GEOJSON_MB, which json
would hold whole many times over. A file of several layers is named with one of them, FILE:LAYER. The area
of interest (--aoi) is such a layer of polygons, laid on a scene as the pixels whose centre lies inside.
"""
import json
import re
from pathlib import Path

import numpy as np

from support import geotiffs, rasters, shapes
from support.cli import DataError
from support.rasters import GIS, LONLAT

OGR_SUFFIXES = (".gpkg", ".shp", ".kml", ".kmz", ".fgb", ".geojsonl", ".geojsons", ".geojsonseq")
# json holds a GeoJSON in about 10 times its size: reading the labels of a 220 MB file of 1.8 million points
# peaked at 2.49 GB, against 1.43 GB through OGR (docs/own-data.md); a larger file than this goes through OGR
GEOJSON_MB = 100


def ogr(what):
    """(pyogrio, shapely): OGR and GEOS, or one line saying that `what` needs the GIS extra."""
    try:
        import pyogrio
        import shapely
    except ImportError:
        raise DataError(f"{what} needs the GIS extra (OGR): {GIS}")
    return pyogrio, shapely


def split_layer(spec):
    """'labels.gpkg:points' -> (Path('labels.gpkg'), 'points'); a path without a layer -> (path, None)."""
    head, colon, layer = str(spec).rpartition(":")
    if colon and layer and Path(head).suffix.lower() in OGR_SUFFIXES and not Path(spec).exists():
        return Path(head), layer
    return Path(spec), None


def is_layer(spec):
    """Whether a labels file is read as a vector layer (not a CSV): OGR's formats and JSON, by its name or
    its first character."""
    path, layer = split_layer(spec)
    if layer or path.suffix.lower() in OGR_SUFFIXES + (".geojson",):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")


def read_features(spec):
    """A vector layer -> (features, crs, fields). features: [(where, geometry type or None, coordinates,
    properties)]; crs: 'EPSG:NNNN' or WKT, None where the file names none; fields: the layer's field names
    (None for a GeoJSON read with json, whose features each have their own)."""
    path, layer = split_layer(spec)
    if path.suffix.lower() in OGR_SUFFIXES or layer:
        return read_ogr(path, layer)
    size = rasters.file_size(path)
    if size <= GEOJSON_MB * 1e6:
        return read_geojson(path)
    try:
        ogr(f"{path}")
    except DataError:
        raise DataError(f"{path}: a GeoJSON of {size / 1e6:.0f} MB, which json would hold in about 10 times "
                        f"that in memory: the GIS extra reads it through OGR ({GIS}), or split it into files "
                        f"under {GEOJSON_MB} MB")
    return read_ogr(path, None)


def read_geojson(path):
    """A GeoJSON FeatureCollection read whole with json -> read_features' (features, crs, None)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    except (ValueError, RecursionError) as e:  # not JSON, not text, or nested past Python's stack
        raise DataError(f"{path}: not JSON ({e})")
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read it whole with json; split it into smaller files")
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection" or not isinstance(features, list):
        top = "a list" if isinstance(doc, list) else f"a {type(doc).__name__}"
        raise DataError(f"{path}: not a GeoJSON FeatureCollection (its top level is {top})")
    out = []
    for k, feature in enumerate(features):
        feature = feature if isinstance(feature, dict) else {}
        geometry = feature.get("geometry") if isinstance(feature.get("geometry"), dict) else {}
        out.append((f"{path}: feature {k}", geometry.get("type"), geometry.get("coordinates"),
                    feature.get("properties") or {}))
    return out, crs_name(doc.get("crs"), path), None


def crs_name(crs, path):
    """GeoJSON's crs member -> 'EPSG:NNNN', or None when there is none (the images' system is assumed)."""
    if crs is None:
        return None
    props = crs.get("properties") if isinstance(crs, dict) else None
    name = str(props.get("name", "")) if isinstance(props, dict) else ""
    if name.endswith("CRS84"):  # longitude, latitude on WGS 84
        return LONLAT
    found = re.search(r"EPSG:(?:[\d.]*:)?(\d+)$", name)
    if not found:
        raise DataError(f"{path}: crs {name or crs!r} is not an EPSG code")
    return f"EPSG:{found.group(1)}"


def read_ogr(path, layer):
    """One layer of a vector file, through OGR -> read_features' (features, crs, fields); a file of several
    layers must name one."""
    pyogrio, shapely = ogr(f"{path}")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        names = pyogrio.list_layers(path)[:, 0].tolist()
    except pyogrio.errors.DataSourceError as e:
        raise DataError(f"{path}: not a vector layer OGR reads ({str(e).splitlines()[0][:200]})")
    if layer is None and len(names) > 1:
        raise DataError(f"{path}: holds {len(names)} layers ({', '.join(names)}): name one, {path}:LAYER")
    if layer is not None and layer not in names:
        raise DataError(f"{path}: has no layer {layer!r} (its layers: {', '.join(names)})")
    meta, _, wkb, values = pyogrio.raw.read(path, layer=layer or names[0])
    crs = meta["crs"]
    if path.suffix.lower() not in OGR_SUFFIXES and crs == LONLAT:  # OGR's for a GeoJSON without a crs
        crs = None  # member: decided as for one read with json (clicks.read_layer)
    where = f"{path}:{layer}" if layer else str(path)
    fields = list(meta["fields"])
    geometries = shapely.from_wkb(wkb)
    del wkb
    points = (shapely.get_type_id(geometries) == 0) & ~shapely.is_empty(geometries)  # a million points: their
    xy = np.zeros((len(geometries), 2))  # positions at once, 5 times faster than shapes one by one
    xy[points] = shapely.get_coordinates(geometries[points])
    geometries[points] = None

    def features():  # one at a time: a shape's coordinates as GeoJSON's, nested positions
        for k, geometry in enumerate(geometries):
            shape = {"type": "Point", "coordinates": xy[k].tolist()} if points[k] else \
                shapely.geometry.mapping(geometry) if geometry is not None else {}
            yield (f"{where}: feature {k}", shape.get("type"), shape.get("coordinates"),
                   {name: v[k] for name, v in zip(fields, values)})

    return features(), crs, fields


# ---------------------------------------------------------------------------- the area of interest


def read_aoi(spec):
    """--aoi FILE: a layer of polygons -> {'shapes': GeoJSON geometries, 'crs': their system (None: the
    scenes' own), 'name'}. Without a crs, positions all within +-180, +-90 are longitude and latitude."""
    rasters.need_gdal(f"--aoi {spec}")  # GDAL lays it on the scenes
    ogr(f"--aoi {spec}")
    features, crs, _ = read_features(spec)
    found, xy = [], []
    for where, kind, coords, _ in features:
        if kind not in ("Polygon", "MultiPolygon"):
            what = f"a {kind}" if kind else "no geometry"
            raise DataError(f"{where}: {what}; an area of interest is polygons")
        parts = shapes.check_geometry(kind, coords, where)
        xy += [ring for polygon in parts for ring in polygon]
        found.append({"type": kind, "coordinates": coords})
    if not found:
        raise DataError(f"--aoi {spec}: holds no polygon")
    if crs is None and (np.abs(np.vstack(xy)) <= (180, 90)).all():
        crs = LONLAT
    return {"shapes": found, "crs": crs, "name": str(spec)}


def laid_on(aoi, geo, where):
    """The area's polygons in a scene's coordinate system; a scene not on the map is one line."""
    if geo is None:
        raise DataError(f"{where}: not placed on the map, so --aoi {aoi['name']} cannot be laid on it")
    if aoi["crs"] is None or geo["crs"] is None or rasters.same_crs(aoi["crs"], geo["crs"]):
        return aoi["shapes"]  # a scene whose system is not known is taken to be in the area's
    from rasterio.warp import transform_geom

    return transform_geom(aoi["crs"], geo["crs"], aoi["shapes"])


def inside(polygons, geo, rows, cols):
    """(h, w) bool of a window (rows, cols: (start, stop)) of a scene: the pixels whose centre lies in the
    polygons (laid_on's), by GDAL's rasteriser."""
    from rasterio.features import geometry_mask
    from rasterio.transform import Affine

    transform = geotiffs.affine(geo) @ Affine.translation(cols[0], rows[0])
    return geometry_mask(polygons, (rows[1] - rows[0], cols[1] - cols[0]), transform, invert=True)


def clip(read, aoi, geo, where):
    """A scene's read(rows, cols) -> (samples, valid) -> the same with the pixels outside the area of
    interest made no data."""
    polygons = laid_on(aoi, geo, where)

    def clipped(rows, cols):
        samples, valid = read(rows, cols)
        within = inside(polygons, geo, rows, cols)
        return samples, within if valid is None else valid & within

    return clipped
