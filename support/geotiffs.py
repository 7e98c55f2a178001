"""Rasters written through GDAL, for predict.py's maps: a tiled, compressed GeoTIFF filled block by block,
its overviews and class names, and the georeference it carries as GDAL takes it."""
from contextlib import contextmanager
from pathlib import Path

from support.rasters import need_gdal


@contextmanager
def create(path, size, geo, dtype, bands=1, nodata=None, compress="deflate", photometric=None):
    """with create(...) as ds: a new GeoTIFF of (H, W) `size` placed as `geo` says (a plain TIFF where it
    is None), tiled and compressed, for ds.write(array, band, window=window(rows, columns)) block by block."""
    rasterio = need_gdal("a GeoTIFF")
    options = {"photometric": photometric} if photometric else {}
    placed = {"crs": geo["crs"], "transform": affine(geo)} if geo else {}  # a picture's: a plain TIFF
    with rasterio.open(path, "w", driver="GTiff", width=size[1], height=size[0], count=bands, dtype=dtype,
                       nodata=nodata, tiled=True, blockxsize=256, blockysize=256, compress=compress,
                       BIGTIFF="IF_SAFER", **placed, **options) as ds:
        yield ds


def affine(geo):
    """A georeference's world-file numbers (at pixel centres) -> GDAL's transform (at pixel corners)."""
    from rasterio.transform import Affine

    a, d, b, e, c, f = geo["world"]
    return Affine(a, b, c - a / 2 - b / 2, d, e, f - d / 2 - e / 2)


def window(rows, cols):
    """(row slice, column slice) -> GDAL's window of them."""
    from rasterio.windows import Window

    return Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)


def overviews(ds, resampling):
    """Overviews of a large raster (halves down to 256 pixels or so), for GIS tools to draw it at any
    zoom (the layout of a cloud-optimised GeoTIFF)."""
    from rasterio.enums import Resampling

    factors = [2**k for k in range(1, 16) if max(ds.width, ds.height) / 2**k >= 256]
    if max(ds.width, ds.height) > 2048 and factors:
        ds.build_overviews(factors, getattr(Resampling, resampling))


def category_names(path, names):
    """The class names as GDAL's category names of band 1, written to `path`: the raster's .aux.xml
    (rasterio writes no categories; GDAL, QGIS and gdalinfo read them there)."""
    from xml.sax.saxutils import escape

    items = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    band = f'<PAMRasterBand band="1"><CategoryNames>{items}</CategoryNames></PAMRasterBand>'
    Path(path).write_text(f"<PAMDataset>{band}</PAMDataset>\n")


def coarser(geo, step):
    """The georeference of every step-th pixel of a scene, pixel (0, 0) first."""
    a, d, b, e, c, f = geo["world"]
    return {**geo, "world": [a * step, d * step, b * step, e * step, c, f]}
