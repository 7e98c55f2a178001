"""Accuracy and area from a stratified sample (Olofsson et al. 2014)."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import assess
import data
from conftest import COLOURS, needs_ogr
from support import maps, rasters
from support.cli import command_line


# Olofsson et al. (2014), section 5, Table 8: sample counts, rows = map class, columns = reference class
PAPER_CLASSES = ["deforestation", "forest gain", "stable forest", "stable non-forest"]


PAPER_COUNTS = [[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]]


PAPER_PIXELS = [200_000, 150_000, 3_200_000, 6_450_000]  # mapped, 30 m pixels of 0.09 ha


def test_accuracy_and_area_give_the_figures_of_olofsson_2014_section_5():
    r = assess.stratified(PAPER_COUNTS, PAPER_PIXELS)
    hectares = sum(PAPER_PIXELS) * 0.09
    assert round(r["overall"], 2) == 0.95
    assert np.round(r["users"], 2).tolist() == [0.88, 0.73, 0.93, 0.96]
    assert np.round(r["producers"], 2).tolist() == [0.75, 0.85, 0.93, 0.96]
    assert PAPER_PIXELS[0] * 0.09 == 18_000 and round(r["area"][0] * hectares) == 21_158
    # the 95% half-width of the deforestation area by eqs. 10-11 is 6,157.6 ha: 6,157 cut to whole
    # hectares, 6,158 rounded (docs/accuracy.md)
    half = assess.Z95 * r["area_se"][0] * hectares
    assert int(half) == 6_157 and round(half) == 6_158
    assert r["area"].sum() == pytest.approx(1) and r["matrix"].sum() == pytest.approx(1)


def stratified_by_points(counts, mapped):
    """The estimates of Olofsson et al. written differently: every point of stratum h stands for N_h / n_h
    pixels (the inverse of its chance to be drawn); each figure is a ratio of two such weighted sums of 0/1
    indicators, R = Y / X, with the variance of a stratified ratio estimator (Cochran 1977, 6.2 and 5.3,
    no finite population correction): V(R) = sum_h N_h^2 s_h^2(y - R x) / n_h / X^2."""
    counts, N = np.asarray(counts), np.asarray(mapped, float)
    cells = [(i, j) for i in range(len(counts)) for j in range(len(counts)) for _ in range(counts[i, j])]
    m, ref = np.array(cells).T  # (points,) map class and reference class of every point
    n_h = np.bincount(m, minlength=len(N))

    def ratio(y, x):
        w = N[m] / n_h[m]
        R = (w * y).sum() / (w * x).sum()
        d = y - R * x
        v = sum(N[h] ** 2 * d[m == h].var(ddof=1) / n_h[h] for h in range(len(N)) if n_h[h])
        return R, np.sqrt(v) / (w * x).sum()

    one, C = np.ones(len(m)), range(len(N))
    return {"overall": ratio((m == ref) * 1.0, one),
            "users": [ratio((m == i) & (ref == i), m == i) for i in C],
            "producers": [ratio((m == j) & (ref == j), ref == j) for j in C],
            "area": [ratio((ref == k) * 1.0, one) for k in C]}


@pytest.mark.parametrize("counts, mapped", [
    (PAPER_COUNTS, PAPER_PIXELS),
    ([[30, 2, 0], [5, 20, 1], [0, 0, 12]], [5000, 900, 37]),  # a stratum whose points all agree
])
def test_the_estimator_equals_weighted_means_over_the_sample_points(counts, mapped):
    r, by_points = assess.stratified(counts, mapped), stratified_by_points(counts, mapped)
    assert np.allclose(by_points["overall"], (r["overall"], r["overall_se"]), rtol=0, atol=1e-12)
    for key in ("users", "producers", "area"):
        assert np.allclose(np.array(by_points[key]).T, (r[key], r[key + "_se"]), rtol=0, atol=1e-12), key


def test_allocation_gives_each_class_its_minimum_and_the_rest_by_area():
    for pixels, size, least in [([10, 1000, 5, 100_000], 300, 50), (PAPER_PIXELS, 640, 75),
                                ([3, 4, 100], 107, 50), ([60, 60, 10_000], 200, 50)]:
        n, base = assess.allocate(pixels, size, least), np.minimum(pixels, least)
        assert n.sum() == size and (n >= base).all() and (n <= pixels).all(), (pixels, n)
        room = np.array(pixels) - base
        capped = n == np.array(pixels)
        share = (size - base.sum()) * room / room.sum()  # the rest by area, where no class is full
        if not capped.any():
            assert (abs(n - base - share) < 1).all(), (pixels, n)
    assert assess.allocate([10, 1000, 5, 100_000], 300).tolist() == [10, 52, 5, 233]


def handmade_maps(root, truth_changes=40, seed=0):
    """Two masks written as predict.py writes them (palette PNGs, one with a world file; 255 = no data),
    their areas.csv, and a 'truth' for each that differs from the map at some pixels -> {image: truth}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names, truths, rows = ["Water", "Land", "Road"], {}, []
    for image, (h, w), geo in [("scenes/a.tif", (30, 40), [0.5, 0.0, 0.0, -0.5, 500000.25, 2800000.0]),
                               ("scenes/b.jpg", (50, 20), None)]:
        pred = np.zeros((h, w), np.uint8)
        pred[:, w // 2 :] = 1
        pred[h // 3 : h // 3 + 6, 2:12] = 2
        pred[:4, :5] = data.IGNORE  # no data
        stem = Path(image).stem
        place = geo and {"world": geo, "crs": "EPSG:32640", "pixel_m2": 0.25}  # UTM zone 40N
        path = maps.write_mask(pred, root / stem, place, names, COLOURS)
        truth = pred.copy()
        ys, xs = rng.integers(0, h, truth_changes), rng.integers(0, w, truth_changes)
        truth[ys, xs] = np.where(pred[ys, xs] == data.IGNORE, data.IGNORE, rng.integers(0, 3, truth_changes))
        truths[image] = truth
        rows += [(image, *row, path.name) for row in maps.class_areas(pred, names, 0.25)]  # 0.5 m pixels
    with open(root / "areas.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "class", "pixels", "share", "hectares", "mask"), *rows])
    return truths


def label_sample(path, truths, names=("Water", "Land", "Road"), out=None):
    """The simulated person: each point of a sample file gets the class of the truth there."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["class"] = names[truths[r["image"]][int(r["y"]), int(r["x"])]]
    with open(out or path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_the_sample_is_stratified_blind_off_no_data_and_the_same_for_a_seed(tmp_path, monkeypatch):
    assert assess.IGNORE == data.IGNORE  # the no-data value of the masks, written out in assess.py
    out = tmp_path / "maps"
    handmade_maps(out)
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "12", "--seed", "4"]) == 0
    text = (out / "sample.csv").read_text()
    with open(out / "sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "x", "y", "class", "sample"] and {r["class"] for r in rows} == {""}
    assert [int(r["sample"]) for r in rows] == list(range(1, 61))
    strata = json.loads((out / "strata.json").read_text())
    masks = {m["image"]: assess.read_mask(out / m["mask"]) for m in strata["masks"]}
    mapped = [masks[r["image"]][int(r["y"]), int(r["x"])] for r in rows]
    assert data.IGNORE not in mapped and len({(r["image"], r["x"], r["y"]) for r in rows}) == 60
    assert np.bincount(mapped, minlength=3).tolist() == strata["points"] == [23, 24, 13]  # 12 each + by area
    assert strata["seed"] == 4
    assert sum(strata["pixels"]) == sum((m != data.IGNORE).sum() for m in masks.values())
    assert mapped[:12] != sorted(mapped[:12])  # the strata mixed in the order a person sees
    if rasters.gdal():  # longitude and latitude (RFC 7946) of the points of the scene on the map
        geo = json.loads((out / "sample.geojson").read_text())["features"]
        a = [r for r in rows if r["image"] == "scenes/a.tif"]
        assert len(geo) == len(a) and geo[0]["properties"]["class"] == ""
        x, y = geo[0]["properties"]["x"], geo[0]["properties"]["y"]
        utm = rasters.reproject("EPSG:4326", "EPSG:32640", *zip(geo[0]["geometry"]["coordinates"]), "test")
        assert np.allclose(np.ravel(utm), [500000.25 + 0.5 * x, 2800000.0 - 0.5 * y], atol=1e-4)
    else:
        assert not (out / "sample.geojson").exists()
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "12", "--seed", "4"]) == 0
    assert (out / "sample.csv").read_text() == text  # the same seed, the same points
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "12", "--seed", "5"]) == 0
    assert (out / "sample.csv").read_text() != text
    # strip by strip (3 rows) against all the pixels of each class at once: the same points
    monkeypatch.setattr(assess, "STRIP", 3)
    classes, images = assess.read_areas(out)
    drawn = assess.draw(out, images, [5, 9, 4], np.random.default_rng(1))
    rng, expected = np.random.default_rng(1), set()
    for c, k in enumerate([5, 9, 4]):
        every = [(im, x, y) for im, m in masks.items() for y, x in zip(*np.nonzero(m == c))]
        expected |= {every[i] for i in rng.choice(len(every), k, replace=False)}
    assert set(drawn) == expected and len(drawn) == 18


def test_estimate_end_to_end_from_a_sample_labelled_by_a_script(tmp_path, capsys):
    out = tmp_path / "maps"
    truths = handmade_maps(out)
    assert assess.main(["sample", str(out), "--size", "80", "--min-per-class", "15"]) == 0
    rows = label_sample(out / "sample.csv", truths)
    assert assess.main(["estimate", str(out)]) == 0
    printed, result = capsys.readouterr().out, json.loads((out / "accuracy.json").read_text())
    strata = json.loads((out / "strata.json").read_text())
    masks = {m["image"]: assess.read_mask(out / m["mask"]) for m in strata["masks"]}
    counts = np.zeros((3, 3), int)
    for r in rows:
        image, x, y = r["image"], int(r["x"]), int(r["y"])
        counts[masks[image][y, x], truths[image][y, x]] += 1
    assert result["error_matrix"]["points"] == counts.tolist()
    expected = assess.stratified(counts, strata["pixels"])
    ha = sum(strata["pixels"]) * 0.25 / 1e4
    assert result["unit"] == "hectares" and strata["hectares_per_pixel"] == pytest.approx(0.25 / 1e4)
    assert result["overall_accuracy"]["estimate"] == pytest.approx(expected["overall"])
    for c, name in enumerate(["Water", "Land", "Road"]):
        got = result["classes"][name]
        assert got["mapped_area"] == pytest.approx(strata["pixels"][c] * 0.25 / 1e4)
        assert got["estimated_area"]["estimate"] == pytest.approx(expected["area"][c] * ha)
        high = (expected["area"][c] + 1.96 * expected["area_se"][c]) * ha
        assert got["estimated_area"]["ci95"][1] == pytest.approx(high)
        assert got["producers_accuracy"]["se"] == pytest.approx(expected["producers_se"][c])
    assert "mapped hectares" in printed and "estimated hectares" in printed
    # the sample labelled in two files: the CSV of one scene, and the other's points in QGIS (the GeoJSON of
    # the sample, its properties filled in; with GDAL, which places them) or in a CSV too
    for name, scene in [("a", "scenes/a.tif"), ("b", "scenes/b.jpg")]:
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([list(rows[0])] + [list(r.values()) for r in rows if r["image"] == scene])
    files = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    if rasters.gdal():
        geo = json.loads((out / "sample.geojson").read_text())
        for f in geo["features"]:
            p = f["properties"]
            p["class"] = ["Water", "Land", "Road"][truths[p["image"]][p["y"], p["x"]]]
        (tmp_path / "a.geojson").write_text(json.dumps(geo))
        files[0] = str(tmp_path / "a.geojson")
    assert assess.main(["estimate", str(out), "--sample", *files]) == 0
    again = json.loads((out / "accuracy.json").read_text())
    assert again["error_matrix"] == result["error_matrix"] and again["classes"] == result["classes"]
    # the map itself as the truth: every estimate is the mapped figure, with no error
    label_sample(out / "sample.csv", {k: m for k, m in masks.items()})
    assert assess.main(["estimate", str(out)]) == 0
    exact = json.loads((out / "accuracy.json").read_text())
    assert exact["overall_accuracy"] == {"estimate": 1.0, "se": 0.0, "ci95": [1.0, 1.0]}
    for c in exact["classes"].values():
        assert c["estimated_area"]["estimate"] == pytest.approx(c["mapped_area"])
        assert c["estimated_area"]["se"] == 0


@needs_ogr
def test_an_area_of_interest_limits_the_sample_and_the_estimate(tmp_path, capsys):
    out = tmp_path / "maps"
    handmade_maps(out)
    corners = [[500000, 2800000.25], [500010, 2800000.25], [500010, 2799990.25], [500000, 2799990.25]]
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32640"}}
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        corners + corners[:1]]}}  # rows 0-19 and columns 0-19 of scenes/a.tif, UTM 40N
    area = tmp_path / "area.geojson"
    area.write_text(json.dumps({"type": "FeatureCollection", "crs": crs, "features": [feature]}))
    assert assess.main(["sample", str(out), "--size", "30", "--min-per-class", "5", "--aoi", str(area)]) == 0
    assert "not on the map, left out: scenes/b.jpg" in capsys.readouterr().out
    mask = assess.read_mask(out / "a_mask.tif")
    inside = np.zeros(mask.shape, bool)
    inside[:20, :20] = True
    strata = json.loads((out / "strata.json").read_text())
    assert strata["aoi"] == str(area) and [m["image"] for m in strata["masks"]] == ["scenes/a.tif"]
    assert strata["pixels"] == np.bincount(mask[inside & (mask != data.IGNORE)], minlength=3).tolist()
    with open(out / "sample.csv", newline="") as f:
        drawn = [(int(r["x"]), int(r["y"])) for r in csv.DictReader(f)]
    assert len(drawn) == 30 and all(inside[y, x] for x, y in drawn)
    label_sample(out / "sample.csv", {"scenes/a.tif": mask})  # the map as the truth: no error inside
    assert assess.main(["estimate", str(out)]) == 0
    assert json.loads((out / "accuracy.json").read_text())["overall_accuracy"]["estimate"] == 1.0


def edit_sample(path, k, **values):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[k].update(values)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_assess_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    out = tmp_path / "maps"
    truths = handmade_maps(out)
    sample = ["sample", str(out), "--size", "40", "--min-per-class", "10"]
    labelled = tmp_path / "labelled.csv"

    def refused(argv, message):
        assert command_line(assess.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert re.match(f"error: .*{message}", err) and err.count("\n") == 1, err

    refused(["sample", str(tmp_path), "--size", "40"], "areas.csv: not found")
    odd = tmp_path / "odd"  # one image's areas with a class the other's lack
    handmade_maps(odd)
    areas = (odd / "areas.csv").read_text().rsplit(",Road,", 1)
    (odd / "areas.csv").write_text(",Lava,".join(areas))
    refused(["sample", str(odd), "--size", "40"],
            "areas.csv: scenes/b.jpg has other classes than scenes/a.tif")
    refused(sample[:3] + ["20"] + sample[4:], r"--size 20: fewer than the minimum, 10 points for each of 3 "
            r"mapped classes \(30\)")
    refused(sample + ["--min-per-class", "1"], "--min-per-class 1: must be 2 or more")
    refused(["estimate", str(out)], r"strata.json: not found \(draw the sample")
    assert assess.main(sample) == 0
    label_sample(out / "sample.csv", truths, out=labelled)
    refused(["estimate", str(out)], "40 of the 40 points of .* have no class yet")
    edit_sample(labelled, 3, **{"class": ""})
    edit_sample(labelled, 5, **{"class": ""})
    refused(["estimate", str(out), "--sample", str(labelled)], "2 of the 40 points")
    label_sample(out / "sample.csv", truths, out=labelled)
    edit_sample(labelled, 0, **{"class": "Lava"})
    estimate = ["estimate", str(out), "--sample", str(labelled)]
    refused(estimate, "labelled.csv:2: class 'Lava' is not a class of the map")
    label_sample(out / "sample.csv", truths, out=labelled)
    edit_sample(labelled, 1, image="scenes/a.tif", x="0", y="0")
    refused(estimate, r"labelled.csv:3: \(0, 0\) is on no data")
    label_sample(out / "sample.csv", truths, out=labelled)
    with open(labelled, newline="") as f:
        x = int(list(csv.DictReader(f))[1]["x"])
    edit_sample(labelled, 1, x=str(x + 1 if x < 10 else x - 1))
    refused(estimate, "labelled.csv:3: sample 2 is .* in .*strata.json")
    label_sample(out / "sample.csv", truths, out=labelled)
    assert not (out / "accuracy.json").exists()  # nothing written by a refused estimate
    label_sample(out / "sample.csv", truths)
    before = [(out / n).read_bytes() for n in ("sample.csv", "strata.json")]
    refused(sample, "sample.csv: already holds labelled points")
    assert [(out / n).read_bytes() for n in ("sample.csv", "strata.json")] == before  # a person's work kept
    mask = out / "b_mask.png"
    im = Image.open(mask)
    pixels = np.asarray(im).copy()
    pixels[-1, -1] = 0 if pixels[-1, -1] else 1
    changed = Image.fromarray(pixels, mode="P")
    changed.putpalette(im.getpalette())
    changed.save(mask)
    refused(["estimate", str(out)], "b_mask.png: its pixels per class differ from those in strata.json")
    if rasters.gdal():  # labelled in QGIS instead: the GeoJSON is kept the same way
        (out / "sample.csv").unlink()
        geo = json.loads((out / "sample.geojson").read_text())
        geo["features"][0]["properties"]["class"] = "Water"
        (out / "sample.geojson").write_text(json.dumps(geo))
        refused(sample, "sample.geojson: already holds labelled points")


NAMES = ["Water", "Land", "Road"]  # the classes of handmade_maps


def test_a_class_sampled_whole_points_nobody_can_tell_and_intervals_within_their_bounds(tmp_path, capsys):
    out = tmp_path / "one"
    truths = handmade_maps(out)
    masks = {image: mask for image, mask, _, _ in assess.read_areas(out)[1]}
    for image, truth in truths.items():  # Road mapped on one pixel only
        m = assess.read_mask(out / masks[image]).copy()
        m[m == 2] = 1
        if image == "scenes/b.jpg":
            m[-1, -1] = 2
        truths[image] = m
        (out / masks[image]).unlink()
        masks[image] = maps.write_mask(m, out / Path(image).stem, None, NAMES, COLOURS).name
    rows = [(im, *row, masks[im]) for im, m in truths.items() for row in maps.class_areas(m, NAMES, None)]
    with open(out / "areas.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "class", "pixels", "share", "hectares", "mask"), *rows])
    assert assess.main(["sample", str(out), "--size", "30", "--min-per-class", "10"]) == 0
    assert json.loads((out / "strata.json").read_text())["hectares"] is None
    rows = label_sample(out / "sample.csv", truths)
    assert assess.main(["estimate", str(out)]) == 0  # its one point is the whole stratum: nothing to estimate
    road = json.loads((out / "accuracy.json").read_text())["classes"]["Road"]
    assert road["points"] == 1 and road["users_accuracy"] == {"estimate": 1.0, "se": 0.0, "ci95": [1.0, 1.0]}
    printed = capsys.readouterr().out
    assert re.search(r"\n {22} +Water +Land +Road\n  Water ", printed)  # the error matrix names its columns
    # points a person cannot tell: marked ?, left out of the estimate and counted
    land = [k for k, r in enumerate(rows) if r["class"] == "Land"]
    for k in land[:2]:
        edit_sample(out / "sample.csv", k, **{"class": "?"})
    assert assess.main(["estimate", str(out)]) == 0
    result = json.loads((out / "accuracy.json").read_text())
    assert sum(c["points_unsure"] for c in result["classes"].values()) == 2
    assert result["points"] == len(rows) - 2
    assert "could not tell (?), left out of the estimate" in capsys.readouterr().out
    for k in land[2:-1]:  # all but one point of a stratum that is no whole class: no variance to estimate
        edit_sample(out / "sample.csv", k, **{"class": "?"})
    assert command_line(assess.main, ["estimate", str(out)]) == 2
    assert "a stratum needs 2 points or more" in capsys.readouterr().err
    # an interval is cut at the bounds of what it estimates
    assert assess.interval(0.945, 0.107 / 1.96)["ci95"] == [pytest.approx(0.838), 1.0]
    assert assess.interval(0.02, 0.05, scale=100)["ci95"] == [0.0, pytest.approx(11.8)]


def test_a_sample_saved_by_a_spreadsheet_is_read(tmp_path):
    out = tmp_path / "maps"
    truths = handmade_maps(out)
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "15"]) == 0
    label_sample(out / "sample.csv", truths)
    assert assess.main(["estimate", str(out)]) == 0
    result = json.loads((out / "accuracy.json").read_text())
    text = (out / "sample.csv").read_text().replace(",", ";").replace("image;", "Image;")
    (out / "sample.csv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode text", a ';' between values
    assert assess.main(["estimate", str(out)]) == 0
    assert json.loads((out / "accuracy.json").read_text())["classes"] == result["classes"]

