"""The map as polygons, and its minimum mapping unit, through GDAL (rasterio) and OGR (pyogrio).

A region is a set of pixels of one class that share edges (4-connected). rasterio.features.sieve (GDAL's
sieve filter) merges each region smaller than --min-area into its largest neighbour; rasterio.features.shapes
(GDAL's polygonize) draws each region as one polygon along its pixels' edges, its holes kept, no outline
simplified. A polygon's area is the sum of its pixels' areas, row by row, as areas.csv counts them, so the
polygons of a class add up to its area there.
"""
import math
import zlib

import numpy as np

from support import IGNORE, layers, rasters, styles
from support.cli import written
from support.rasters import LONLAT

FIELDS = ["class", "image", "area_m2", "area_ha"]


def min_pixels(min_area, geo):
    """--min-area in m2 -> the fewest pixels a region keeps (on a grid in degrees, at the scene's mean pixel
    area), or None where a pixel's area is unknown."""
    area = None if geo is None else geo["pixel_m2"]
    if area is None:
        return None
    return math.ceil(min_area / float(np.mean(area)) * (1 - 1e-9))  # 1e-9: 100 / 0.01 is 10000.000000000002


def sieve(mask, pixels):
    """Merge the regions of fewer than `pixels` pixels of a (H, W) class mask into their largest neighbour, in
    place; no data (IGNORE) is left as it is and merges into nothing. GDAL merges a small region only where a
    chain of largest neighbours leads to a large one, so the pass is repeated until one changes nothing; a
    small region with no class around it (an island in no data) stays. Memory: the mask and its valid pixels,
    2 bytes a pixel, and GDAL's table of regions."""
    from rasterio.features import sieve as gdal_sieve

    valid, changed = mask != IGNORE, True
    while changed:  # a checksum tells a pass that changed nothing, with no copy of the mask
        before = zlib.crc32(mask)
        gdal_sieve(mask, pixels, out=mask, mask=valid, connectivity=4)
        changed = zlib.crc32(mask) != before
    return mask


def regions(mask_path, geo):
    """A class mask on disk -> (its polygons in map coordinates (shapely), their classes, areas in m2)."""
    rasterio = rasters.gdal()
    _, shapely = layers.ogr("--polygons")
    from rasterio.features import shapes

    with rasterio.open(mask_path) as ds:  # read by GDAL row by row: the polygons are held, not the mask
        found = [(shapely.Polygon(shape["coordinates"][0], shape["coordinates"][1:]), int(value))
                 for shape, value in shapes(rasterio.band(ds, 1), connectivity=4) if value != IGNORE]
        height, to_pixels = ds.height, ~ds.transform
    polygons, classes = np.array([p for p, _ in found], object), np.array([v for _, v in found], int)
    return polygons, classes, pixel_areas(polygons, to_pixels, geo["pixel_m2"], height)


def pixel_areas(polygons, to_pixels, pixel_m2, height):
    """Polygons along pixel edges -> the area of each in m2. to_pixels: the affine transform from map
    coordinates to pixel corners (column, row); pixel_m2: one number, or one per row (degrees). An edge from
    (x, y0) to (x, y1) sweeps the pixels of rows y0..y1 left of column x: x times the area of one column of
    pixels over those rows, P[y1] - P[y0]; summed round a ring it is the ring's area (horizontal edges sweep
    nothing), and a polygon's is its outline's less its holes'."""
    import shapely

    P = np.concatenate([[0.0], np.cumsum(np.broadcast_to(np.asarray(pixel_m2, float), (height,)))])
    rings, polygon = shapely.get_rings(polygons, return_index=True)  # each polygon's outline, then its holes
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    t = to_pixels
    x = np.rint(t.a * xy[:, 0] + t.b * xy[:, 1] + t.c)  # whole numbers: pixel corners
    y = np.rint(t.d * xy[:, 0] + t.e * xy[:, 1] + t.f).astype(int)
    edge = ring[1:] == ring[:-1]  # vertex i to i + 1, within one ring
    swept = np.bincount(ring[:-1][edge], (x[:-1] * (P[y[1:]] - P[y[:-1]]))[edge], minlength=len(rings))
    outline = np.r_[True, polygon[1:] != polygon[:-1]]
    return np.bincount(polygon, np.where(outline, 1, -1) * np.abs(swept), minlength=len(polygons))


def write_polygons(out, scenes, how, names, colours):
    """scenes: [(image name, mask path, geo)] -> map.gpkg in `out` (one layer, 'map', in the scenes'
    coordinate system; one per system, map_EPSG, where they differ), or with how='geojson' map.geojson in
    longitude and latitude (RFC 7946); map.qml beside it -> (paths, the number of polygons). Scenes off the
    map are left out, in one line."""
    pyogrio, shapely = layers.ogr("--polygons")
    placed = [s for s in scenes if s[2] and s[2]["crs"]]
    left = [str(s[0]) for s in scenes if s not in placed]
    if left:
        print(f"--polygons: leaves out {', '.join(left[:5])}{' ...' * (len(left) > 5)}: no coordinate system")
    groups = {}  # coordinate system -> its scenes; all in one, moved to longitude and latitude, for GeoJSON
    for s in placed:
        crs = LONLAT if how == "geojson" else next((c for c in groups if rasters.same_crs(c, s[2]["crs"])),
                                                   s[2]["crs"])
        groups.setdefault(crs, []).append(s)
    if not groups:
        return [], 0
    path, count = out / ("map.geojson" if how == "geojson" else "map.gpkg"), 0
    with written(path) as tmp:
        tmp.unlink()  # OGR makes the file; a second layer goes into the same one
        for k, (crs, group) in enumerate(groups.items()):
            found = [layer_rows(image, mask, geo, names, how == "geojson") for image, mask, geo in group]
            geometry, columns = np.concatenate([f[0] for f in found]), [sum((f[1][i] for f in found), [])
                                                                          for i in range(len(FIELDS))]
            # RFC 7946: lon, lat, 7 decimals (1 cm); GeoPackage 1.2, read without a warning by GDAL before 3.7
            options = {"layer_options": {"RFC7946": "YES"}} if how == "geojson" else {"VERSION": "1.2"}
            columns = [np.array(c, object if i < 2 else float) for i, c in enumerate(columns)]
            count += len(geometry)
            pyogrio.raw.write(tmp, shapely.to_wkb(geometry), columns, FIELDS, crs=crs, **options,
                              geometry_type="Polygon", driver="GeoJSON" if how == "geojson" else "GPKG",
                              layer="map" if len(groups) == 1 else layer_name(crs, k))
    return [path, styles.polygon_style(out / "map.qml", names, colours)], count


def layer_rows(image, mask, geo, names, lonlat):
    """One scene's polygons -> (geometries, [classes, images, m2, ha]), in longitude and latitude if asked."""
    import shapely
    from rasterio.warp import transform

    polygons, classes, m2 = regions(mask, geo)
    if lonlat:
        to_lonlat = lambda p: np.column_stack(transform(geo["crs"], LONLAT, p[:, 0], p[:, 1]))  # noqa: E731
        polygons = shapely.transform(polygons, to_lonlat)
    return polygons, [[names[c] for c in classes], [image] * len(classes), m2.tolist(), (m2 / 1e4).tolist()]


def layer_name(crs, k):
    """The layer of the k-th coordinate system where scenes lie in several: map_32640 (its EPSG code), or
    map_2 for the second where it has none."""
    from rasterio.crs import CRS

    return f"map_{CRS.from_user_input(crs).to_epsg() or k + 1}"
