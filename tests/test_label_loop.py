"""The loop a newcomer runs (label.py, train.py, predict.py --suggest, label.py again): what each says
where the others leave off."""
import csv
import json


from support import clicks


def test_suggestion_margins_are_written_so_that_they_tell_apart(tmp_path):
    # a suggestion sits on a class boundary, where the margin is near 0; bf16 logits often tie (0)
    rows = [("a.png", 1, 2, 0, 3.1e-05), ("a.png", 3, 4, 1, 0.0), ("a.png", 5, 6, 1, 0.25)]
    geos = {"a.png": {"world": (0.5, 0.0, 500000.0, 0.0, -0.5, 2800000.0), "crs": None}}
    path, geojson = clicks.write_suggestions(tmp_path, rows, ["Water", "Road"], geos)
    assert [r["margin"] for r in csv.DictReader(open(path))] == ["3.1e-05", "0", "0.25"]
    features = json.loads(geojson.read_text())["features"]
    assert [f["properties"]["margin"] for f in features] == [3.1e-05, 0.0, 0.25]
