"""The loop a newcomer runs (label.py, train.py, predict.py --suggest, label.py again): what each says
where the others leave off."""
import csv
import json

import pytest
from PIL import Image

import train
from support import clicks, layout, rasters
from support.cli import DataError


def test_train_without_labels_says_how_to_give_them(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(root / "a.png")
    with pytest.raises(DataError, match="no labels to train on: give your clicks with --point-labels FILE"):
        layout.run_data(train.get_args(["--data", str(root)]), root)


def test_suggestion_margins_are_written_so_that_they_tell_apart(tmp_path):
    # a suggestion sits on a class boundary, where the margin is near 0; bf16 logits often tie (0)
    rows = [("a.png", 1, 2, 0, 3.1e-05), ("a.png", 3, 4, 1, 0.0), ("a.png", 5, 6, 1, 0.25)]
    geos = {"a.png": {"world": (0.5, 0.0, 0.0, -0.5, 500000.0, 2800000.0), "crs": "EPSG:32640"}}
    path, *geojson = clicks.write_suggestions(tmp_path, rows, ["Water", "Road"], geos)
    assert [r["margin"] for r in csv.DictReader(open(path))] == ["3.1e-05", "0", "0.25"]
    if rasters.gdal():  # which places the points in longitude and latitude
        features = json.loads(geojson[0].read_text())["features"]
        assert [f["properties"]["margin"] for f in features] == [3.1e-05, 0.0, 0.25]


def test_train_takes_the_classes_beside_the_clicks_else_their_names_in_usual_colours(tmp_path):
    root, work = tmp_path / "photos", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    Image.new("RGB", (40, 30)).save(root / "a.png")
    (work / "clicks.csv").write_text("image,x,y,class\na.png,1,1,Road\na.png,2,2,Water\n")
    args = train.get_args(["--data", str(root), "--point-labels", str(work / "clicks.csv")])
    names, colours = ["Water", "Land", "Road"], [(0, 0, 255), (210, 180, 140), (128, 128, 128)]
    layout.write_classes(work / "classes.json", names, colours)  # as label.py --classes saves them
    run = layout.run_data(args, root)
    assert (run["classes"], run["colours"], run["points"]) == (names, colours, [(0, 1, 1, 2), (0, 2, 2, 0)])
    (work / "classes.json").unlink()  # none: the names in the clicks, sorted, in their usual colours
    run = layout.run_data(args, root)
    assert (run["classes"], run["colours"]) == (["Road", "Water"], [(127, 127, 127), (31, 119, 180)])
    # a usual colour stays its class's, whatever comes before; other names take the palette's in turn
    usual = [layout.hex_to_rgb(h) for h in ["#1F77B4", "#D2B48C", "#7F7F7F", "#D62728", "#2CA02C"]]
    assert layout.default_colours(["Water", "Land", "Road", "Building", "Vegetation"]) == usual
    assert layout.default_colours(["a", "Water", "River"]) == [layout.hex_to_rgb(h) for h in
                                                                ["#FF7F0E", "#1F77B4", "#2CA02C"]]
