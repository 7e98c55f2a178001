"""The map as GIS layers: labels in every vector format QGIS writes, polygons and a minimum mapping unit, an
area of interest, QGIS styles, the margin as a raster; each flag without the GIS extra."""
import csv
import json
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import assess
import data
import predict
import train
from conftest import FIXTURES, geotiff_tags, needs_ogr, save_geotiff, tiny_args
from support import clicks, geotiffs, layers, layout, maps, polygons, rasters
from support.cli import DataError, command_line

LAYERS = FIXTURES / "layers"  # written by make_layers.sh
SCENE = "multispectral_uint16_utm40n.tif"  # where the labels of LAYERS lie: 64x64 pixels of 2 m, UTM 40N


def placed(epsg, world, rows):
    """A georeference as rasters.georeference gives it."""
    from rasterio.crs import CRS

    crs = CRS.from_epsg(epsg)
    return {"world": world, "crs": crs.to_wkt(), "pixel_m2": rasters.pixel_area(world, crs, rows)}


def square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def write_geojson(path, geometries, **crs):
    features = [{"type": "Feature", "properties": {}, "geometry": g} for g in geometries]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features, **crs}))
    return path


@needs_ogr
def test_every_vector_format_qgis_writes_labels_the_pixels_its_geojson_labels(monkeypatch):
    info = {SCENE: rasters.image_info(FIXTURES / SCENE)}
    names = layout.read_classes(FIXTURES / "classes.json")[0]

    def read(*files, **flags):
        return sorted(clicks.read_clicks([LAYERS / f for f in files], info, names, **flags)[0][SCENE])

    everything, points = read("labels.geojson"), read("points.geojson")  # made by ogr2ogr from these two
    assert len(points) == 4 and len(everything) > 300  # the pixels of the lines and polygons too
    for files in [("labels.gpkg:points", "labels.gpkg:shapes"), ("labels.kml",), ("labels.fgb",),
                  ("labels.geojsonl",)]:  # the KML and GeoJSONSeq in longitude and latitude
        assert read(*files) == everything, files
    assert read("points.shp") == points
    monkeypatch.setattr(layers, "GEOJSON_MB", 1e-6)  # a GeoJSON past the size json reads whole: through OGR
    assert read("labels.geojson") == everything
    for files, flags, message in [
            (["labels.gpkg"], {}, r"labels.gpkg: holds 2 layers \(points, shapes\): name one, \S+gpkg:LAYER"),
            (["labels.gpkg:lines"], {}, r"labels.gpkg: has no layer 'lines' \(its layers: points, shapes\)"),
            (["points.shp"], {"field": "kind"}, r"points.shp: no field kind for the class \(its fields: "
                                                r"class, note\)$")]:
        with pytest.raises(DataError, match=message):
            read(*files, **flags)


@needs_ogr
def test_a_point_layer_made_by_ogr2ogr_trains_on_exactly_the_pixels_of_its_geojson(tmp_path, capsys):
    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / SCENE).write_bytes((FIXTURES / SCENE).read_bytes())

    def points(*flags):
        args = train.get_args(["--data", str(folder), "--val-images", "0", *flags])
        return layout.run_data(args, folder)["points"]

    reference = points("--point-labels", str(LAYERS / "points.geojson"))
    assert points("--point-labels", str(LAYERS / "points.shp")) == reference
    assert points("--point-labels", str(LAYERS / "labels.kml")) == points("--point-labels",
                                                                           str(LAYERS / "labels.geojson"))
    run = tmp_path / "run"
    train.main(tiny_args(folder, run, "--labels", f"{LAYERS / 'labels.gpkg'}:points", "--val-images", "0"))
    clicks.write_points(tmp_path / "reference.csv", reference, [SCENE])
    assert (run / "points.csv").read_text() == (tmp_path / "reference.csv").read_text()
    # an area of interest over the left half: the labels on the right (and on no data) are left out
    write_geojson(tmp_path / "left.geojson", [square(326000, 2788000, 326064, 2787872)],
                  crs={"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32640"}})
    capsys.readouterr()
    kept = points("--point-labels", str(LAYERS / "labels.geojson"), "--aoi", str(tmp_path / "left.geojson"))
    every = points("--point-labels", str(LAYERS / "labels.geojson"))
    valid = rasters.read_scene(folder / SCENE)["valid"]  # a strip of no data on the left
    assert kept == [p for p in every if p[1] < 32 and valid[p[2], p[1]]] and 0 < len(kept) < len(every)
    assert f"--aoi: {len(every) - len(kept)} of the {len(every)} training labels lie outside it" in \
        capsys.readouterr().out


def test_without_the_gis_extra_each_flag_is_one_line_with_the_install_hint(tiny, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(rasters, "gdal", lambda: None)
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # import pyogrio fails, as where it is not installed
    area = write_geojson(tmp_path / "area.geojson", [square(0, 0, 1, 1)])
    hint = re.escape(rasters.GIS)
    for flags in [["--polygons"], ["--min-area", "25"], ["--margin"], ["--aoi", str(area)]]:
        args = ["--ckpt", str(tmp_path / "none.pt"), str(tmp_path), *flags]  # refused before a model is read
        assert command_line(predict.main, args) == 2
        said = capsys.readouterr().err
        assert said.count("\n") == 1 and re.search(f"{flags[0]}.* needs the GIS extra .*{hint}", said)
    assert command_line(train.main, ["--data", str(tiny), "--aoi", str(area), "--out", str(tmp_path / "r")]) \
        == 2
    assert command_line(assess.main, ["sample", str(tmp_path), "--size", "9", "--aoi", str(area)]) == 2
    assert capsys.readouterr().err.count(f"--aoi {area} needs the GIS extra") == 2
    for labels in ["labels.gpkg:points", "points.shp", "labels.kml", "labels.fgb", "labels.geojsonl"]:
        with pytest.raises(DataError, match=f"needs the GIS extra .OGR.: {hint}"):
            clicks.read_clicks([LAYERS / labels], {})
    monkeypatch.setattr(layers, "GEOJSON_MB", 1e-6)
    with pytest.raises(DataError, match=f"a GeoJSON of 0 MB, .*: the GIS extra reads it through OGR "
                       f".{hint}., or split it into files under 1e-06 MB"):
        clicks.read_clicks([LAYERS / "labels.geojson"], {})
    monkeypatch.setattr(layers, "GEOJSON_MB", 100)

    def out_of_memory(text):  # as json.loads on a 212 MB file did (3 GB): one line, no traceback
        raise MemoryError

    monkeypatch.setattr(layers.json, "loads", out_of_memory)
    said = "labels.geojson: not enough memory to read it whole with json; split"
    with pytest.raises(DataError, match=said):
        clicks.read_clicks([LAYERS / "labels.geojson"], {})


@needs_ogr
def test_polygons_follow_pixel_edges_keep_holes_add_up_to_the_areas_and_sieve_small_regions(tmp_path,
                                                                                           capsys):
    import rasterio
    from rasterio.features import rasterize

    pred = np.random.default_rng(0).integers(0, 3, (40, 50)).astype(np.uint8)  # noise: many small regions
    pred[5:30, 8:33], pred[10:20, 13:23], pred[14:16, 17:19] = 1, 2, 0  # a hole in a hole: an island
    pred[:, :3] = data.IGNORE
    names, colours = ["a", "b", "c"], [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    for geo in [placed(32640, [0.5, 0.0, 0.0, -0.5, 327000.25, 2787999.75], 40),  # UTM: 0.25 m2 a pixel
                placed(4326, [0.01, 0.0, 0.0, -0.01, 55.005, 25.995], 40)]:  # degrees: each row's own area
        mask = maps.write_mask(pred, tmp_path / "scene", geo, names, colours)
        shapes, classes, m2 = polygons.regions(mask, geo)
        with rasterio.open(mask) as ds:  # drawn back by GDAL's rasteriser (pixel centres): the mask again
            back = rasterize(zip(shapes, classes), pred.shape, fill=255, transform=ds.transform)
        assert np.array_equal(back, pred)
        assert np.allclose(np.bincount(classes, m2, 3), maps.count_classes(pred, 3, geo["pixel_m2"])[1],
                           rtol=1e-12, atol=0)
        assert sum(len(p.interiors) for p in shapes) >= 2
    geo = placed(32640, [0.5, 0.0, 0.0, -0.5, 327000.25, 2787999.75], 40)
    assert polygons.min_pixels(4, geo) == 16 and polygons.min_pixels(1e4, geo) == 40000
    _, _, m2 = polygons.regions(maps.write_mask(pred, tmp_path / "scene", geo, names, colours), geo)
    large = rasterize([(p, 1) for p, a in zip(shapes, m2) if a >= 4], pred.shape,
                      transform=geotiffs.affine(geo))
    sieved = polygons.sieve(pred.copy(), 16)
    assert np.array_equal(sieved == data.IGNORE, pred == data.IGNORE)  # no data stays no data
    assert np.array_equal(sieved[large == 1], pred[large == 1]) and (sieved != pred).sum() > 100
    _, _, m2 = polygons.regions(maps.write_mask(sieved, tmp_path / "sieved", geo, names, colours), geo)
    assert m2.min() >= 4  # no region smaller than the unit is left
    picture = maps.write_mask(pred, tmp_path / "picture", None, names, colours)  # a PNG: not on the map
    assert polygons.write_polygons(tmp_path, [("picture.jpg", picture, None)], "gpkg", names, colours) == \
        ([], 0)
    assert "--polygons: leaves out picture.jpg: no coordinate system" in capsys.readouterr().out


@needs_ogr
def test_predict_writes_polygons_a_minimum_mapping_unit_an_area_of_interest_styles_and_margins(tiny_run,
                                                                                               tmp_path):
    import pyogrio
    import rasterio

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (70, 90, 4)).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0  # an empty collar: no data
    save_geotiff(tmp_path / "ortho.tif", rgba, geotiff_tags())  # UTM 40N, 0.5 m pixels from (500000, 2800000)
    corners = rasters.reproject("EPSG:32640", "EPSG:4326", [500005, 500030], [2799998, 2799973], "test")
    aoi = write_geojson(tmp_path / "aoi.geojson", [square(*np.ravel(corners, "F"))])  # RFC 7946: lon, lat
    inside = np.zeros((70, 90), bool)
    inside[4:54, 20:60] = True  # columns 10 to 59, rows 4 to 53, less the collar
    ckpt = torch.load(tiny_run[1] / "ckpt.pt", weights_only=True)
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "ortho.tif"), "--precision", "fp32",
            "--aoi", str(aoi)]
    out, dense = tmp_path / "out", tmp_path / "dense"
    assert predict.main(args + ["--out", str(out), "--polygons", "--min-area", "2", "--margin", "--suggest",
                                "2"]) == 0
    assert predict.main(args + ["--out", str(dense), "--polygons", "geojson"]) == 0
    with rasterio.open(out / "ortho_mask.tif") as a, rasterio.open(dense / "ortho_mask.tif") as b:
        mask, unsieved = a.read(1), b.read(1)
    assert np.array_equal(mask == data.IGNORE, ~inside) and np.array_equal(polygons.sieve(unsieved, 8), mask)
    with rasterio.open(out / "ortho_margin.tif") as ds:
        margin = ds.read(1)
        assert ds.dtypes[0] == "float32" and np.isnan(ds.nodata) and ds.transform == a.transform
    assert np.array_equal(np.isnan(margin), ~inside) and 0 <= np.nanmin(margin) <= np.nanmax(margin) <= 1
    for folder, name in [(out, "map.gpkg"), (dense, "map.geojson")]:  # the three agree: mask, areas, polygons
        _, _, _, (classes, images, m2, ha) = pyogrio.raw.read(folder / name)
        areas = list(csv.DictReader(open(folder / "areas.csv")))
        assert sum(int(r["pixels"]) for r in areas) == inside.sum()
        assert set(images) == {str(tmp_path / "ortho.tif")}
        for r in areas:
            # hectares to 4 decimals: within half a square metre, and the float error of a sum of areas
            assert abs(m2[classes == r["class"]].sum() - float(r["hectares"]) * 1e4) <= 0.5 + 1e-6
        assert np.allclose(ha, m2 / 1e4) and (m2 >= 2).all() if folder == out else m2.min() == 0.25
    lonlat = json.loads((dense / "map.geojson").read_text())
    assert "crs" not in lonlat and 57 < lonlat["features"][0]["geometry"]["coordinates"][0][0][0] < 57.001
    legend = [(e.get("label"), e.get("color")) for e in ET.parse(out / "ortho_mask.qml").iter("paletteEntry")]
    expected = [(n, "#%02x%02x%02x" % tuple(c)) for n, c in zip(ckpt["classes"], ckpt["colours"])]
    assert legend == expected
    style = ET.parse(out / "map.qml").getroot().find("renderer-v2")
    assert style.get("type") == "categorizedSymbol" and style.get("attr") == "class"
    assert [c.get("value") for c in style.iter("category")] == ckpt["classes"]
    fills = [o.get("value") for o in style.iter("Option") if o.get("name") == "color"]
    assert fills == ["%d,%d,%d,255" % tuple(c) for c in ckpt["colours"]]


@needs_ogr
def test_the_committed_map_layers_are_what_the_code_writes_today(tmp_path):
    import pyogrio
    import rasterio

    names, colours = layout.read_classes(FIXTURES / "classes.json")
    with rasterio.open(FIXTURES / "class_map_nodata255.tif") as ds:  # as make_layers.sh writes them
        pred = ds.read(1)
    geo = rasters.image_info(FIXTURES / "class_map_nodata255.tif")[1]
    mask = maps.write_mask(pred, tmp_path / "class_map", geo, names, colours)
    margin = np.where(pred == 255, np.nan, np.linspace(0, 1, pred.shape[1], dtype=np.float32)[None, :])
    with maps.margin_file(tmp_path / "class_map", pred.shape, geo, True) as (write, _):
        write(slice(0, pred.shape[0]), slice(0, pred.shape[1]), margin.astype(np.float32))
    polygons.write_polygons(tmp_path, [("class_map_nodata255.tif", mask, geo)], "gpkg", names, colours)
    for name in ["class_map_mask.tif", "class_map_margin.tif"]:
        with rasterio.open(tmp_path / name) as now, rasterio.open(LAYERS / name) as then:
            assert np.array_equal(now.read(), then.read(), equal_nan=True)
            assert str(now.profile) == str(then.profile)  # str: NaN, the margin's no data, equals no NaN
    for name in ["class_map_mask.qml", "map.qml", "class_map_mask.tif.aux.xml"]:
        assert (tmp_path / name).read_text() == (LAYERS / name).read_text()
    now, then = pyogrio.raw.read(tmp_path / "map.gpkg"), pyogrio.raw.read(LAYERS / "map.gpkg")
    assert list(now[2]) == list(then[2]) and all(np.array_equal(a, b) for a, b in zip(now[3], then[3]))
    said = (LAYERS / "map.gpkg.ogrinfo.txt").read_text()  # what GDAL 3.6's ogrinfo says of the committed file
    assert f"Feature Count: {len(now[2])}" in said and "area_m2: Real" in said
