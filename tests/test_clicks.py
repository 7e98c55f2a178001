"""Clicks and drawn labels: CSV and GeoJSON, pixels and map coordinates, lines and polygons, the loop
from clicks to a second model, simulated annotators."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
import train
from conftest import FIXTURES, geotiff_tags, needs_gdal, save_geotiff, tile_masks, tiny_args, write_tiff
from support import clicks, layout, rasters, shapes
from support.cli import DataError, command_line
from tools import simulate


@needs_gdal  # GeoTIFF scenes
def test_click_files_as_spreadsheets_and_other_programs_write_them(tmp_path):
    info = {n: rasters.image_info(FIXTURES / n) for n in ["scene_rgb.png", "ORTHO_0001.JPG",
                                                          "multispectral_uint16_utm40n.tif"]}
    expected = json.loads((FIXTURES / "clicks.expected.json").read_text())
    names = expected["classes"]
    rows = [(Path(i.replace("\\", "/")).name, x, y, names.index(c)) for i, x, y, c in expected["csv_rows"]]
    for name in ["clicks_excel_utf8.csv", "clicks_excel_semicolon.csv"]:  # a BOM, CRLF; semicolons
        by_image, _ = clicks.read_clicks([FIXTURES / name], info, names)
        assert sorted((n, *p) for n, points in by_image.items() for p in points) == sorted(rows)
    utf16 = tmp_path / "unicode.txt"  # Excel's "Unicode text": UTF-16, tabs
    utf16.write_text("image\tx\ty\tclass\nscene_rgb.png\t5\t7\tWater\n", encoding="utf-16")
    assert clicks.read_clicks([utf16], info, names)[0] == {"scene_rgb.png": [(5, 7, 0)]}
    for name in ["clicks_label_studio.json", "clicks_empty_list.json"]:
        with pytest.raises(DataError, match=f"{name}: not a GeoJSON FeatureCollection .its top level is a"):
            clicks.read_clicks([FIXTURES / name], info, names)
    for name, what in [("clicks_nan.geojson", "nan"), ("clicks_infinity.geojson", "inf")]:
        with pytest.raises(DataError, match=rf"{name}: feature \d: coordinates .*{what}.* are not finite"):
            clicks.read_clicks([FIXTURES / name], info, names)
    with pytest.raises(DataError, match="clicks_crs_null_properties.geojson: crs .* is not an EPSG code"):
        clicks.read_clicks([FIXTURES / "clicks_crs_null_properties.geojson"], info, names)


def centre_on_map(col, row, tie=(0.0, 0.0, 500000.0, 2800000.0), size=0.5):
    """Map x, y of the centre of pixel (col, row) of a GeoTIFF whose tie point (PixelIsArea) puts the
    raster corner position (i, j) at map (x, y): written out from the GeoTIFF specification."""
    i, j, x, y = tie
    return x + (col + 0.5 - i) * size, y - (row + 0.5 - j) * size


def feature(x, y, **properties):
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": properties}


def geojson(features, epsg=32640):
    crs = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    return json.dumps({"type": "FeatureCollection", "crs": crs, "features": features})


@needs_gdal  # GeoTIFFs placed on the map
def test_a_click_on_a_pixel_centre_is_found_on_that_pixel(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    tie = (2.0, 3.0, 500100.0, 2800200.0)  # raster corner (2, 3) lies at this map point
    save_geotiff(tmp_path / "tags.tif", image, geotiff_tags(tie=tie))
    Image.fromarray(image).save(tmp_path / "world.png")
    (tmp_path / "world.pgw").write_text("2\n0\n0\n-2\n1000\n2000\n")  # pixel (0, 0): centre at (1000, 2000)
    info = {n: rasters.image_info(tmp_path / n) for n in ["tags.tif", "world.png"]}
    x, y = centre_on_map(7, 4, tie)
    features = [feature(x, y, label="a"), feature(x + 0.24, y - 0.24, label="b"),  # half a pixel is 0.25
                feature(x + 0.26, y, label="c"), feature(1000 + 12 * 2, 2000 - 9 * 2, label="d"),
                feature(1000 + 12 * 2 - 0.99, 2000 - 9 * 2 + 0.99, label="e"), feature(0, 0, label="f")]
    (tmp_path / "clicks.geojson").write_text(geojson(features, epsg=32640))
    by_image, names = clicks.read_clicks([tmp_path / "clicks.geojson"], info)
    assert names == ["a", "b", "c", "d", "e"]  # f lies on no image
    assert by_image == {"tags.tif": [(7, 4, 0), (7, 4, 1), (8, 4, 2)], "world.png": [(12, 9, 3), (12, 9, 4)]}


@needs_gdal  # GeoTIFFs placed on the map
@pytest.mark.parametrize("case, message", [
    ("not JSON", "not JSON"),
    ("not a FeatureCollection", "not a GeoJSON FeatureCollection"),
    ("a collection", "feature 1: a GeometryCollection, not a Point, LineString or Polygon"),
    ("without the GIS extra", r"no image of the data set is georeferenced .*requirements-gis.txt"),
    ("a JSON list", "not a GeoJSON FeatureCollection .its top level is a list"),
    ("NaN coordinates", r"feature 0: coordinates \(nan, .*\) are not finite numbers"),
    ("infinite coordinates", r"feature 0: coordinates \(inf, .*\) are not finite numbers"),
    ("a crs without properties", "crs .* is not an EPSG code"),
    ("no class", r"feature 0: no class \(class or class_name or label or class_id"),
    ("a class not in classes.json", "feature 0: class 'Lava' is not in classes.json"),
    ("no point on an image", "no click on an image of the data set"),
    ("a CSV row with bad numbers", "clicks.csv:3: expected columns image,x,y,class with whole numbers"),
    ("a CSV row outside its image", r"clicks.csv:2: point \(40, 0\) is outside a.tif \(40x30\)"),
    ("a CSV row naming no image", "clicks.csv:2: unknown image 'b.tif'"),
    ("every class left empty", "clicks.csv:2: no click has a class yet"),
    ("an unclosed ring", r"feature 1: ring 0 of the Polygon is not closed: its first position \(5000"),
    ("empty coordinates", "feature 1: a MultiPolygon with empty coordinates"),
    ("a ring of 3 positions", "feature 1: ring 1 of polygon 0 of the MultiPolygon has 3 position.s.; a clo"),
    ("a line of 1 position", r"feature 1: line 1 of the MultiLineString has 1 position\(s\); a line needs 2"),
    ("a polygon on no image", "feature 1: the Polygon covers no pixel of any image"),
    ("a polygon of two rows", r"clicks.csv:3: a polygon of 2 row\(s\); it needs 3 positions at least"),
    ("a stroke of two classes", "clicks.csv:3: the rows of one stroke must name one image and one class"),
])
def test_bad_clicks_are_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, case, message):
    root = tmp_path / "scenes"
    root.mkdir()
    save_geotiff(root / "a.tif", np.zeros((30, 40, 3), np.uint8), geotiff_tags())
    x, y = centre_on_map(3, 3)
    features, classes = [feature(x, y, **{"class": "Water"})], None
    text = {"not JSON": "{nope", "not a FeatureCollection": json.dumps({"type": "Feature"}),
            "a collection": geojson(features + [{"type": "Feature", "properties": {"class": "Water"},
                                                 "geometry": {"type": "GeometryCollection"}}]),
            "without the GIS extra": geojson(features), "a JSON list": "[]",
            "NaN coordinates": geojson([feature(math.nan, y, **{"class": "Water"})]),
            "infinite coordinates": geojson([feature(math.inf, y, **{"class": "Water"})]),
            "a crs without properties": json.dumps({"type": "FeatureCollection", "features": features,
                                                    "crs": {"type": "name", "properties": None}}),
            "no class": geojson([feature(x, y, name="Water")]),
            "a class not in classes.json": geojson([feature(x, y, **{"class": "Lava"})]),
            "no point on an image": geojson([feature(0, 0, **{"class": "Water"})])}.get(case)
    square = [[x, y], [x + 2, y], [x + 2, y - 2], [x, y - 2], [x, y]]
    shape = {"an unclosed ring": ("Polygon", [square[:-1]]), "empty coordinates": ("MultiPolygon", []),
             "a ring of 3 positions": ("MultiPolygon", [[square, square[:2] + square[:1]]]),
             "a line of 1 position": ("MultiLineString", [square[:2], square[:1]]),
             "a polygon on no image": ("Polygon", [[[p[0] - 1000, p[1]] for p in square]])}.get(case)
    if shape:
        geometry = {"type": shape[0], "coordinates": shape[1]}
        text = geojson(features + [{"type": "Feature", "properties": {"class": "W"}, "geometry": geometry}])
    path = tmp_path / "clicks.geojson"
    if text is None:
        path = tmp_path / "clicks.csv"
        text = {"a CSV row with bad numbers": "image,x,y,class\na.tif,1,1,Water\na.tif,1.5,2,Water\n",
                "a CSV row outside its image": "image,x,y,class\na.tif,40,0,Water\n",
                "a CSV row naming no image": "image,x,y,class\nb.tif,1,1,Water\n",
                "every class left empty": "image,x,y,class\na.tif,1,1,\n",
                "a polygon of two rows": "image,x,y,class,polygon\na.tif,1,1,Water,\na.tif,2,2,Water,7\n"
                                         "a.tif,3,2,Water,7\n",
                "a stroke of two classes": "image,x,y,class,stroke\na.tif,1,1,W,1\na.tif,9,1,Sea,1\n"}[case]
    if case == "a class not in classes.json":
        classes = json.dumps({"classes": [{"title": "Water", "color": "#0000FF"}]})
        (root / "classes.json").write_text(classes)
    path.write_text(text)
    if case == "without the GIS extra":
        monkeypatch.setattr(rasters, "gdal", lambda: None)  # as where rasterio is not installed
    out = tmp_path / "run"
    assert command_line(train.main, tiny_args(root, out, "--point-labels", str(path))) == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])
    assert not out.exists()  # refused before anything is written, the folder included


def scenes_and_clicks(tiny, root, per_image=15):
    """Three images of the tiny set without masks: two GeoTIFFs placed apart on the map, and one 16-bit
    TIFF with a world file. -> clicks drawn from the masks the folder does not have, as
    [(image name, x, y, class name)]."""
    names, colours = layout.read_classes(tiny)
    _, images, masks = tile_masks(tiny, [1, 2], colours)
    root.mkdir()
    ties = {"a.tif": (0.0, 0.0, 500000.0, 2800000.0), "b.tif": (0.0, 0.0, 500200.0, 2800000.0)}
    for name, image in zip(["a.tif", "b.tif"], images):
        save_geotiff(root / name, image, geotiff_tags(tie=ties[name]))
    write_tiff(root / "c.tif", images[2].astype(np.uint16) * 200 + 1000)
    (root / "c.tfw").write_text(f"0.5\n0\n0\n-0.5\n{501000.25}\n{2800000 - 0.25}\n")
    points = data.sample_points(masks[:3], 96, per_image, seed=3)[0]
    return [("abc"[i] + ".tif", x, y, names[c]) for i, x, y, c in points], ties


@needs_gdal  # GeoTIFFs placed on the map
def test_own_images_and_clicks_train_predict_suggest_and_train_again(tiny, tmp_path, capsys):
    root = tmp_path / "scenes"
    rows, ties = scenes_and_clicks(tiny, root)
    lines = [f"{n},{x},{y},{c}\n" for n, x, y, c in rows]
    (tmp_path / "clicks.csv").write_text("image,x,y,class\n" + "".join(lines))
    world = {"c.tif": (501000.25, 2800000 - 0.25)}  # the centre of its top-left pixel
    mapped = [centre_on_map(x, y, ties[n]) if n in ties else (world[n][0] + x * 0.5, world[n][1] - y * 0.5)
              for n, x, y, _ in rows]
    (tmp_path / "clicks.geojson").write_text(geojson([feature(mx, my, label=c)
                                                      for (mx, my), (*_, c) in zip(mapped, rows)]))
    runs = []
    for clicks_file in ["clicks.csv", "clicks.geojson"]:
        runs.append(tmp_path / clicks_file.replace(".", "_"))
        train.main(tiny_args(root, runs[-1], "--point-labels", str(tmp_path / clicks_file), "--epochs", "2"))
    said = capsys.readouterr().out
    held = re.search(r"held out for validation \(--val-images 1\): (\S+)\n", said)  # a fifth, at least 1
    assert held and held.group(1) in ("a.tif", "b.tif", "c.tif")
    # the same clicks in pixels and on the map: the same points, the same loss table
    trained = [(r / "points.csv").read_text() for r in runs]
    assert trained[0] == trained[1] and held.group(1) not in trained[0]  # never trained on
    assert len(trained[0].splitlines()) == 1 + 2 * 15
    history = [json.loads((r / "metrics.json").read_text())["history"] for r in runs]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]
    last = history[0][-1]
    assert "miou" not in last and last["click_count"] == 15 and 0 <= last["click_accuracy"] <= 1
    classes = json.loads((runs[0] / "classes.json").read_text())["classes"]
    assert [c["title"] for c in classes] == sorted({c for *_, c in rows})  # the names in the clicks, sorted
    assert list(last["click_f1"]) == list(last["click_recall"]) == [c["title"] for c in classes]
    # map the folder, suggest where to click next, fill the suggestions in, train again
    out = tmp_path / "maps"
    ckpt = runs[1] / "ckpt.pt"
    args = ["--ckpt", str(ckpt), str(root), "--out", str(out), "--device", "cpu", "--precision", "fp32"]
    assert predict.main(args + ["--suggest", "4"]) == 0
    suggested = list(csv.DictReader(open(out / "suggestions.csv")))
    assert len(suggested) == 3 * 4 and all(r["class"] == "" for r in suggested)
    assert {r["hint"] for r in suggested} <= {c["title"] for c in classes}
    doc = json.loads((out / "suggestions.geojson").read_text())  # RFC 7946: longitude, latitude, no crs
    assert "crs" not in doc and len(doc["features"]) == 2 * 4  # c.tif: a world file, no coordinate system
    said = capsys.readouterr().out
    assert re.search(r"suggestions.geojson: leaves out \S+c.tif: no coordinate system known", said)
    info = {n: rasters.image_info(root / n) for n in ["a.tif", "b.tif", "c.tif"]}
    placed = [(n, size, geo["world"]) for n, (size, geo) in info.items()]
    for f, r in zip(doc["features"], suggested):  # back from longitude and latitude to the same pixel
        (x,), (y,) = rasters.reproject("EPSG:4326", "EPSG:32640", *zip(f["geometry"]["coordinates"]), "test")
        assert clicks.locate(placed, x, y) == (Path(r["image"]).name, int(r["x"]), int(r["y"]))
        f["properties"]["class"] = f["properties"]["hint"]  # the annotator fills the class in
    (out / "suggestions.geojson").write_text(json.dumps(doc))
    again = tmp_path / "again"
    train.main(tiny_args(root, again, "--point-labels", str(tmp_path / "clicks.geojson"),
                         str(out / "suggestions.geojson")))
    assert len((again / "points.csv").read_text().splitlines()) == 1 + 2 * 15 + 8


@needs_gdal
def test_gps_points_land_where_gdal_puts_them_and_a_4_band_scene_trains_maps_and_suggests(tmp_path, capsys):
    name = "multispectral_uint16_utm40n.tif"
    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / name).write_bytes((FIXTURES / name).read_bytes())
    info = {name: rasters.image_info(folder / name)}
    expected = json.loads((FIXTURES / "clicks.expected.json").read_text())
    names = expected["classes"]
    gps = [p for p in expected["wgs84_points"] if p["image"] == name]  # the others lie on ORTHO_0001.JPG
    points = sorted((*p["gdallocationinfo_pixel"], names.index(p["class"])) for p in gps)
    by_image, _ = clicks.read_clicks([FIXTURES / "clicks_wgs84.geojson"], info, names)  # RFC 7946: no crs
    assert sorted(by_image[name]) == points and "read as RFC 7946 GeoJSON" in capsys.readouterr().out
    rows = [(*p["lonlat"], p["class"]) for p in gps]
    (tmp_path / "gps.csv").write_text("lon;lat;class\n" + "".join(f"{x};{y};{c}\n" for x, y, c in rows))
    assert sorted(clicks.read_clicks([tmp_path / "gps.csv"], info, names)[0][name]) == points
    utm = [(*p["utm40n"], p["class"]) for p in gps]
    (tmp_path / "utm.csv").write_text("x,y,class\n" + "".join(f"{x},{y},{c}\n" for x, y, c in utm))
    utm = clicks.read_clicks([tmp_path / "utm.csv"], info, names, crs="EPSG:32640")[0]
    assert sorted(utm[name]) == points
    run, out = tmp_path / "run", tmp_path / "maps"
    train.main(tiny_args(folder, run, "--point-labels", str(FIXTURES / "clicks_wgs84.geojson")))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["bands"] == [1, 2, 3, 4] and len(ckpt["norm"]["mean"]) == 4
    assert predict.main(["--ckpt", str(run / "ckpt.pt"), str(folder), "--out", str(out), "--suggest", "2",
                         "--precision", "fp32", "--show-bands", "4,1,2"]) == 0
    assert len(json.loads((out / "suggestions.geojson").read_text())["features"]) == 2
    assert Image.open(out / "multispectral_uint16_utm40n_mask.tif").size == (64, 64)


def inside_by_ray_casting(rings, w, h):
    """The reference for shapes.polygon_pixels, written another way: for every pixel centre (column i,
    row j at (i, j)) at once, the parity of the edges a ray to the right crosses, each edge tested by the
    sign of a cross product (no division), taking an edge's rows half-open as the scanline does."""
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    inside = np.zeros((h, w), bool)
    for ring in rings:
        for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:]):
            spans = (y1 <= rows) != (y2 <= rows)
            right = np.sign((x2 - x1) * (rows - y1) - (cols - x1) * (y2 - y1)) == np.sign(y2 - y1)
            inside ^= spans & right
    return inside


def as_mask(pixels, w, h):
    mask = np.zeros((h, w), bool)
    mask[pixels[1], pixels[0]] = True
    return mask


def test_a_polygon_labels_the_pixels_whose_centre_lies_inside_it_holes_and_half_pixels_included():
    rng = np.random.default_rng(0)
    w, h = 21, 17
    for k in range(300):  # rings on the pixel grid, on the half-pixel grid (centres on edges), anywhere
        rings = []
        for _ in range(rng.integers(1, 4)):  # an outer ring and holes, or rings that cross
            grids = [rng.integers(-3, 26, (6, 2)), rng.integers(-6, 50, (6, 2)) / 2,
                     rng.uniform(-3, 25, (6, 2))]
            corners = grids[k % 3][: rng.integers(3, 7)]
            rings.append(np.vstack([corners, corners[:1]]).astype(float))
        labelled = as_mask(shapes.polygon_pixels(rings, (w, h)), w, h)
        assert (labelled == inside_by_ray_casting(rings, w, h)).all()
    # GDAL's pixel corners (2, 2) to (7, 7) are (1.5, 1.5) to (6.5, 6.5) here: pixels 2 to 6, a hole 3 to 4
    square = lambda a, b: np.array([(a, a), (b, a), (b, b), (a, b), (a, a)], float)
    labelled = as_mask(shapes.polygon_pixels([square(1.5, 6.5), square(3.5, 5.5)[::-1]], (w, h)), w, h)
    expected = np.zeros((h, w), bool)
    expected[2:7, 2:7], expected[4:6, 4:6] = True, False
    assert (labelled == expected).all()
    # edges through pixel centres: in on the left and top, out on the right and bottom; two polygons
    # that share an edge share no pixel and leave none out
    expected[:] = False
    expected[2:6, 2:6] = True
    assert (as_mask(shapes.polygon_pixels([square(2, 6)], (w, h)), w, h) == expected).all()
    halves = [np.array(t, float) for t in
              [[(2, 2), (9, 2), (2, 9), (2, 2)], [(9, 2), (9, 9), (2, 9), (9, 2)]]]
    a, b = (as_mask(shapes.polygon_pixels([t], (w, h)), w, h) for t in halves)
    whole = as_mask(shapes.polygon_pixels([square(2, 9)], (w, h)), w, h)
    assert not (a & b).any() and ((a | b) == whole).all() and whole.sum() == 49
    # partly off the image: clipped; wholly off: nothing
    assert as_mask(shapes.polygon_pixels([square(-5.5, 3.5)], (w, h)), w, h).sum() == 16
    assert len(shapes.polygon_pixels([square(30, 40)], (w, h))[0]) == 0


def test_a_line_labels_the_pixels_within_half_its_width():
    w, h = 40, 30
    line = np.array([(5, 10), (20, 10)], float)  # along the centres of row 10
    expected = np.zeros((h, w), bool)
    expected[10, 5:21] = True  # width 1: the row, ends rounded by half a pixel (no more centre)
    assert (as_mask(shapes.line_pixels(line, 1, (w, h)), w, h) == expected).all()
    expected[9:12, 4:22] = True  # width 3: three rows, a pixel past each end (distance 1 and sqrt 2 <= 1.5)
    assert (as_mask(shapes.line_pixels(line, 3, (w, h)), w, h) == expected).all()
    diagonal = as_mask(shapes.line_pixels(np.array([(0, 0), (10, 10)], float), 1, (w, h)), w, h)
    assert (np.argwhere(diagonal) == [(k, k) for k in range(11)]).all()  # 8-connected, no corner cut
    rng = np.random.default_rng(1)
    for _ in range(50):  # against a distance computed case by case: before the start, past the end, along
        line, width = rng.uniform(-5, 45, (rng.integers(2, 6), 2)), rng.uniform(0.5, 6)
        rows, cols = np.mgrid[0:h, 0:w].astype(float)
        nearest = np.full((h, w), np.inf)
        for (x1, y1), (x2, y2) in zip(line[:-1], line[1:]):
            along = ((cols - x1) * (x2 - x1) + (rows - y1) * (y2 - y1)) / ((x2 - x1) ** 2 + (y2 - y1) ** 2)
            across = np.abs((x2 - x1) * (rows - y1) - (y2 - y1) * (cols - x1)) / np.hypot(x2 - x1, y2 - y1)
            d = np.where(along < 0, np.hypot(cols - x1, rows - y1),
                         np.where(along > 1, np.hypot(cols - x2, rows - y2), across))
            nearest = np.minimum(nearest, d)
        assert (as_mask(shapes.line_pixels(line, width, (w, h)), w, h) == (nearest <= width / 2)).all()


def test_labels_of_two_classes_on_one_pixel_leave_it_without_a_label(capsys):
    by_image = {"a": [(1, 1, 0), (1, 1, 0), (2, 2, 0), (3, 3, 1), (2, 2, 1), (2, 2, 0)],
                "b": [(5, 5, 2), (5, 5, 1)]}  # a point on a shape of another class, say
    assert shapes.one_class_per_pixel(by_image) == {"a": [(1, 1, 0), (3, 3, 1)]}
    assert "2 pixel(s) claimed by two classes or more are left without a label" in capsys.readouterr().out


def test_strokes_and_polygons_of_a_pixel_csv_in_any_column_order(tmp_path):
    info = {"a.png": ((40, 30), None)}
    rows = ["stroke,polygon,class,y,x,image", "1,,Water,10,5,a.png", "1,,Water,10.0,20,a.png",  # a stroke
            ",,Land,1,1,a.png",  # a point
            "1,,Water,20,30,a.png", "1,,Water,25,30,a.png", "1,,Water,40,30,a.png",  # another: apart
            ",4,Land,20,10,a.png", ",4,Land,20,14,a.png", ",4,Land,24,14,a.png", ",4,Land,24,10,a.png",
            "2,,Land,5,35,a.png"]  # a stroke of one row (a short drag on the page): a dot
    (tmp_path / "page.csv").write_text("\n".join(rows) + "\n")
    by_image, names = clicks.read_clicks([tmp_path / "page.csv"], info, line_width=1)
    expected = {(x, 10, 1) for x in range(5, 21)} | {(30, y, 1) for y in range(20, 30)} | {(1, 1, 0)}
    expected |= {(35, 5, 0)}
    expected |= {(x, y, 0) for x in range(10, 14) for y in range(20, 24)}  # a ring through pixel centres
    assert names == ["Land", "Water"] and sorted(by_image["a.png"]) == sorted(expected)


def qgis_layer(epsg=32640):
    """Features as QGIS exports a layer: a MultiPolygon with a hole and a Polygon overlapping it on a.tif,
    a MultiLineString along pixel centres on b.tif and, partly off it, on c.tif, and a Point on c.tif.
    -> (GeoJSON features, {(image, column, row, class)} expected for --line-width 1, pixels claimed twice)."""
    a = lambda i, j: [500000 + 0.5 * i, 2800000 - 0.5 * j]  # a.tif: GDAL's pixel corner (i, j) on the map
    b = lambda col, row: list(centre_on_map(col, row, (0.0, 0.0, 500200.0, 2800000.0)))
    c = lambda col, row: [501000.25 + 0.5 * col, 2800000 - 0.25 - 0.5 * row]  # c.tif's world file
    ring = lambda f, lo, hi: [f(lo, lo), f(hi, lo), f(hi, hi), f(lo, hi), f(lo, lo)]
    geometries = [("Water", "MultiPolygon", [[ring(a, 10, 30), ring(a, 15, 20)[::-1]]]),
                  ("Land", "Polygon", [ring(a, 25, 40)]),
                  ("Road", "MultiLineString", [[b(5, 40), b(30, 40)], [c(50, -20), c(50, 10)]]),
                  ("Building", "Point", c(60, 60))]
    features = [{"type": "Feature", "properties": {"fid": k + 1, "class": name},
                 "geometry": {"type": kind, "coordinates": coordinates}}
                for k, (name, kind, coordinates) in enumerate(geometries)]
    square = lambda lo, hi: {(i, j) for i in range(lo, hi) for j in range(lo, hi)}
    water, land = square(10, 30) - square(15, 20), square(25, 40)
    pixels = {("a.tif", i, j, "Water") for i, j in water - land}
    pixels |= {("a.tif", i, j, "Land") for i, j in land - water}
    pixels |= {("b.tif", i, 40, "Road") for i in range(5, 31)} | {("c.tif", 50, j, "Road") for j in range(11)}
    return features, pixels | {("c.tif", 60, 60, "Building")}, len(water & land)


@needs_gdal  # GeoTIFFs placed on the map
def test_a_qgis_layer_of_polygons_lines_and_points_trains_maps_and_suggests(tiny, tmp_path, capsys):
    root = tmp_path / "scenes"
    scenes_and_clicks(tiny, root)
    features, expected, twice = qgis_layer()
    (tmp_path / "layer.geojson").write_text(geojson(features))
    run, out = tmp_path / "run", tmp_path / "maps"
    train.main(tiny_args(root, run, "--labels", str(tmp_path / "layer.geojson"), "--line-width", "1",
                         "--val-images", "0", "--patch", "32", "--batch-size", "32"))  # one step: 7 patches
    said = capsys.readouterr().out
    assert f"{twice} pixel(s) claimed by two classes or more are left without a label" in said
    classes = [c["title"] for c in json.loads((run / "classes.json").read_text())["classes"]]
    trained = {(r["image"], int(r["x"]), int(r["y"]), classes[int(r["class"])])
               for r in csv.DictReader(open(run / "points.csv"))}
    assert trained == expected and twice == 25
    assert predict.main(["--ckpt", str(run / "ckpt.pt"), str(root), "--out", str(out), "--suggest", "2",
                         "--device", "cpu", "--precision", "fp32"]) == 0
    assert len(json.loads((out / "suggestions.geojson").read_text())["features"]) == 2 * 2  # c.tif: no system


@needs_gdal
def test_shapes_in_longitude_and_latitude_land_on_the_pixels_of_their_utm_vertices(tiny, tmp_path, capsys):
    root = tmp_path / "scenes"
    scenes_and_clicks(tiny, root)
    info = {n: rasters.image_info(root / n) for n in ["a.tif", "b.tif"]}  # c.tif's system is unknown
    features, _, _ = qgis_layer()
    (tmp_path / "utm.geojson").write_text(geojson(features))
    to_lonlat = lambda x, y: [v[0] for v in rasters.reproject("EPSG:32640", "EPSG:4326", [x], [y], "test")]
    move = lambda c: to_lonlat(*c) if isinstance(c[0], float) else [move(p) for p in c]
    for f in features:
        f["geometry"]["coordinates"] = move(f["geometry"]["coordinates"])
    (tmp_path / "lonlat.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    utm = clicks.read_clicks([tmp_path / "utm.geojson"], info, line_width=1)
    assert clicks.read_clicks([tmp_path / "lonlat.geojson"], info, line_width=1) == utm  # RFC 7946: no crs
    assert "read as RFC 7946 GeoJSON" in capsys.readouterr().out


@needs_gdal  # GeoTIFFs placed on the map
def test_bad_geometry_from_the_command_line_is_one_line_and_exit_code_2(tmp_path, capsys):
    root = tmp_path / "scenes"
    root.mkdir()
    save_geotiff(root / "a.tif", np.zeros((30, 40, 3), np.uint8), geotiff_tags())
    x, y = centre_on_map(3, 3)
    ring = {"type": "Polygon", "coordinates": [[[x, y], [x + 2, y], [x + 2, y - 2], [x, y - 1]]]}
    (tmp_path / "layer.geojson").write_text(geojson([{"type": "Feature", "properties": {"class": "W"},
                                                      "geometry": ring}]))
    args = tiny_args(root, tmp_path / "run", "--labels", str(tmp_path / "layer.geojson"))
    assert command_line(train.main, args) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "layer.geojson: feature 0: ring 0 of the Polygon is not closed" in said
    assert not (tmp_path / "run").exists()


def test_simulated_annotators_stay_in_one_class_and_spend_the_time_given(tiny, tmp_path, capsys):
    names, colours = layout.read_classes(tiny)
    files, _, masks = tile_masks(tiny, [1, 2], colours)
    info = {n: rasters.image_info(tiny / n) for n in files}
    patches = sum((m[y : y + 32, x : x + 32] != data.IGNORE).any() for m in masks
                  for y in (0, 32, 64) for x in (0, 32, 64))  # the 32x32 grid patches with a class
    for kind, seconds in [("points", 2.4), ("strokes", 10.9), ("polygons", 14.4)]:
        out = tmp_path / f"{kind}.csv"
        simulate.main(["--data", str(tiny), "--tiles", "1,2", "--kind", kind, "--seconds", "30",
                       "--patch", "32", "--out", str(out), "--seed", "1"])
        said = capsys.readouterr().out
        rows = list(csv.DictReader(open(out)))
        labels = len(rows) if kind == "points" else len({r[kind[:-1]] for r in rows})
        budget = 30 * patches
        assert "0 found no place" in said and f"{labels} labels on {patches} patches" in said
        if kind == "points":  # 30 / 2.4 = 12.5: whole points per patch, those --points 12 draws
            assert labels == 12 * patches
            drawn = data.sample_points(masks, 32, 12, seed=1)[0]
            written = [(r["image"], int(r["x"]), int(r["y"])) for r in rows]
            assert written == [(files[i], x, y) for i, x, y, _ in drawn]
        else:
            assert budget - seconds < labels * seconds <= budget + 1e-6  # the leftover passes on
        by_image, _ = clicks.read_clicks([out], info, names, line_width=3)  # as train.py reads it
        for name, mask in zip(files, masks):
            xs, ys, cs = np.array(by_image[name]).T
            assert (mask[ys, xs] == cs).all()  # every labelled pixel has the mask's class
        pixels = sum(len(v) for v in shapes.one_class_per_pixel(by_image).values())
        assert f"{pixels} labelled pixels" in said
        if kind == "strokes":
            assert pixels > 10 * labels  # a stroke is many pixels
