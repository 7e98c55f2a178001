"""Maps on disk: masks (GeoTIFF or PNG and world file), overlays, areas, huge scenes, predict.py's flags."""
import copy
import csv
import errno
import json
import math
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import assess
import data
import predict
import train
from conftest import FIXTURES, classes_json, geotiff_tags, needs_gdal, save_geotiff, tile_masks, tiny_args
from conftest import write_set, write_tiff
from support import layout, maps, rasters
from support.cli import DataError, command_line
from support.speed import fold_batch_norm


def test_a_scene_is_mapped_in_blocks_each_seen_with_a_halo_around_it(tiny_run):
    model = fold_batch_norm(copy.deepcopy(tiny_run[0])).eval()
    image = np.random.default_rng(0).integers(0, 255, (300, 130, 3)).astype(np.uint8)
    logits_of = partial(predict.sliding_window, model, dtype=torch.float32, window=96)
    whole = logits_of(image)
    read = lambda rows, cols: (image[rows[0] : rows[1], cols[0] : cols[1]], None)  # noqa: E731
    blocks = maps.logits_in_blocks(lambda s, v: logits_of(s), read, (300, 130), block=320)
    (_, one, samples, _), = blocks  # a scene of one block: the whole-image pass
    assert torch.equal(one, whole) and np.array_equal(samples, image)
    covered = np.zeros((300, 130), int)
    for (rows, cols), logits, samples, _ in maps.logits_in_blocks(lambda s, v: logits_of(s), read, (300, 130),
                                                                 block=64, halo=32):
        covered[rows, cols] += 1
        assert rows.start % 32 == cols.start % 32 == 0 and np.array_equal(samples, image[rows, cols])
        top, left = max(rows.start - 32, 0), max(cols.start - 32, 0)  # the block and 32 pixels around it
        around = logits_of(image[top : rows.stop + 32, left : cols.stop + 32])
        inside = slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left)
        assert torch.equal(logits, around[:, inside[0], inside[1]])
    assert (covered == 1).all()  # every pixel once
    pred, gap = maps.map_in_blocks(logits_of, image, margin=True)
    top2 = whole.softmax(0).topk(2, dim=0).values
    assert np.array_equal(pred, whole.argmax(0).numpy()) and np.allclose(gap, top2[0] - top2[1], atol=1e-6)


@needs_gdal
def test_a_geotiff_is_mapped_to_a_geotiff_gdal_and_qgis_read_as_a_map(tiny_run, tmp_path, capsys):
    import rasterio

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (70, 90, 4)).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0  # an orthomosaic's empty border: no data
    save_geotiff(tmp_path / "ortho.tif", rgba, geotiff_tags())
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "ortho.tif"), "--out", str(out)]
    assert predict.main(args + ["--precision", "fp32"]) == 0
    ckpt = torch.load(tiny_run[1] / "ckpt.pt", weights_only=True)
    with rasterio.open(tmp_path / "ortho.tif") as scene, rasterio.open(out / "ortho_mask.tif") as mask:
        assert mask.crs == scene.crs and mask.crs.to_epsg() == 32640 and mask.transform == scene.transform
        assert mask.nodata == data.IGNORE and mask.profile["tiled"] and mask.compression.name == "deflate"
        assert [mask.colormap(1)[i][:3] for i in range(5)] == [tuple(c) for c in ckpt["colours"]]
        classes = mask.read(1)
        assert (classes[:, :20] == data.IGNORE).all() and (classes[:, 20:] < 5).all()
        assert (mask.dataset_mask()[:, :20] == 0).all()  # GDAL counts the collar as no data, not a class
    categories = re.findall(r"<Category>(.*?)</Category>", (out / "ortho_mask.tif.aux.xml").read_text())
    assert categories == ckpt["classes"]
    with rasterio.open(out / "ortho_overlay.tif") as overlay:  # the picture, on the map too
        assert overlay.crs == scene.crs and overlay.transform == scene.transform and overlay.count == 3
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert [r["class"] for r in rows] == ckpt["classes"]
    assert sum(int(r["pixels"]) for r in rows) == 70 * 70  # the valid pixels
    assert {r["mask"] for r in rows} == {"ortho_mask.tif"}  # the mask these pixels were counted on
    for r in rows:
        assert float(r["hectares"]) == pytest.approx(int(r["pixels"]) * 0.25 / 1e4, abs=1e-4)
        assert float(r["share"]) == pytest.approx(int(r["pixels"]) / 4900, abs=1e-4)


def test_world_files_carry_over_and_shared_names_stay_apart(tiny_run, tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "scene.jpg")
    (tmp_path / "a" / "scene.jgw").write_text("0.3\n0\n0\n-0.3\n400000.15\n3000000.15\n")
    (tmp_path / "a" / "SCENE.PRJ").write_text((FIXTURES / "ORTHO_0001.PRJ").read_text())  # ArcGIS's ESRI WKT
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32"]
    scenes = [str(tmp_path / f / "scene.jpg") for f in ("a", "b")]
    assert predict.main(args + scenes + scenes[:1]) == 0  # the same file twice is mapped once
    said = capsys.readouterr().out
    areas = list(csv.DictReader(open(out / "areas.csv")))
    if rasters.gdal():  # the world file and the ESRI .prj place it: a GeoTIFF of the map, areas in hectares
        import rasterio

        assert "share a file name" in said and said.count("a_scene_mask.tif") == 1
        assert sorted(p.name for p in out.iterdir()) == [
            "a_scene_mask.qml", "a_scene_mask.tif", "a_scene_mask.tif.aux.xml", "a_scene_overlay.tif",
            "areas.csv", "b_scene_mask.png", "b_scene_mask.qml", "b_scene_overlay.jpg",
            "classes.json"]
        with rasterio.open(out / "a_scene_mask.tif") as mask:
            assert mask.crs.to_epsg() == 32640 and mask.transform.c == 400000.0 and mask.transform.a == 0.3
        assert {r["hectares"] != "" for r in areas if r["image"].endswith("a/scene.jpg")} == {True}
    else:  # a world file beside the mask; its .prj is read through GDAL only, which a line says
        assert "its .prj (coordinate system) is read with the GIS extra" in said
        assert sorted(p.name for p in out.iterdir()) == [
            "a_scene_mask.pgw", "a_scene_mask.png", "a_scene_mask.qml", "a_scene_overlay.jgw",
            "a_scene_overlay.jpg", "areas.csv", "b_scene_mask.png", "b_scene_mask.qml", "b_scene_overlay.jpg",
            "classes.json"]
        world = (out / "a_scene_mask.pgw").read_text().split()
        assert world == ["0.3", "0.0", "0.0", "-0.3", "400000.15", "3000000.15"]
        assert all(r["hectares"] == "" for r in areas)  # a world file alone: no units


def test_scenes_past_pillows_guard_are_mapped_with_progress(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the guard refuses images over 2000 pixels
    monkeypatch.setattr(maps, "BLOCK", 96)  # several blocks
    image = np.random.default_rng(0).integers(0, 256, (200, 60, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    assert np.array_equal(layout.read_image(tmp_path / "big.png")[0], image)  # training reads it too
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "big.png"), "--out", str(tmp_path / "o")]
    assert predict.main(args + ["--precision", "fp32"]) == 0
    assert Image.MAX_IMAGE_PIXELS == 1000  # and back on after it
    said = capsys.readouterr().out
    assert re.search(r"\d+% of 0.0 MP  [\d.]+ MP/s  \d+s left", said)
    monkeypatch.undo()
    assert Image.open(tmp_path / "o" / "big_mask.png").size == (60, 200)


def test_the_overlay_of_a_scene_in_blocks_holds_its_own_pixels(tiny_run, tmp_path, monkeypatch):
    """Every step-th pixel of each block, kept for the overlay, is copied: a view would hold each whole
    block in memory to the end (a 2-gigapixel scene was killed at 22 GB)."""
    monkeypatch.setattr(maps, "BLOCK", 96)
    monkeypatch.setattr(maps, "OVERLAY", 2000)  # every 3rd pixel of a 200 x 60 scene
    kept, write_overlay = [], maps.write_overlay
    monkeypatch.setattr(maps, "write_overlay", lambda s, *a: kept.append(s) or write_overlay(s, *a))
    Image.fromarray(np.zeros((200, 60, 3), np.uint8)).save(tmp_path / "big.png")
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "big.png"), "--out", str(tmp_path / "o")]
    assert predict.main(args + ["--precision", "fp32"]) == 0
    pieces = [p for _, _, p in kept[0]["samples"]] + kept[0]["pred"]
    assert len(pieces) > 2 and all(p.base is None or p.base.size == p.size for p in pieces)


@needs_gdal
def test_a_masked_orthophoto_maps_no_collar_and_counts_no_collar(tiny_run, tmp_path, capsys):
    """The black collar GDAL marks with a mask band (inside a JPEG-YCbCr TIFF, a .msk beside a JPEG, or
    GDAL's mask after a JPEG's end) is no class in the map and no hectares in areas.csv."""
    names = ["rgb_jpeg_ycbcr_internal_mask.tif", "rgb_jpeg_external_mask.jpg", "rgb_jpeg_appended_mask.jpg"]
    for name in names + ["rgb_jpeg_external_mask.jpg.msk"]:
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32"]
    assert predict.main(args + [str(tmp_path / n) for n in names]) == 0
    rows = list(csv.DictReader(open(out / "areas.csv")))
    for name in names:
        gdal = json.loads((FIXTURES / f"{name}.expected.json").read_text())["valid_pixels"]
        assert sum(int(r["pixels"]) for r in rows if r["image"].endswith(name)) == gdal == 960
        mask = next(out.glob(f"{Path(name).stem}_mask.*[gf]"))
        assert (np.array(Image.open(mask)) == data.IGNORE).sum() == 32 * 48 - 960
    assert capsys.readouterr().out.count("no data: 576 pixels") == 3


@needs_gdal
def test_areas_on_a_geographic_grid_sum_to_the_earth(tiny_run, tmp_path):
    (tmp_path / "globe.tif").write_bytes((FIXTURES / "globe_4326_10deg.tif").read_bytes())
    out = tmp_path / "maps"
    assert predict.main(["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "globe.tif"), "--out",
                         str(out), "--precision", "fp32"]) == 0
    hectares = sum(float(r["hectares"]) for r in csv.DictReader(open(out / "areas.csv")))
    sphere = 4 * math.pi * 6371008.8**2 / 1e4
    assert hectares == pytest.approx(sphere, rel=1e-6)  # each row at its own latitude, not one area for all
    rows = json.loads((FIXTURES / "globe_4326_10deg.areas.json").read_text())["pixel_ha_by_row"]
    geo = rasters.image_info(tmp_path / "globe.tif")[1]
    assert np.allclose(np.array(geo["pixel_m2"]) / 1e4, rows, rtol=1e-9)


def test_predict_refuses_a_data_set_with_other_classes(tiny_run, tmp_path):
    files = {"Tile 1/images/a.png": (np.zeros((4, 4, 3), np.uint8), None)}
    other = write_set(tmp_path / "other", classes_json(), files)
    with pytest.raises(DataError, match="classes differ"):
        predict.main(["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--data", str(other), "--out",
                      str(tmp_path / "p")])
    with pytest.raises(DataError, match="no such checkpoint"):
        predict.main(["--ckpt", str(tmp_path / "missing.pt"), "a.jpg", "--out", str(tmp_path / "p")])


@needs_gdal  # a 5-band TIFF
def test_predict_flags_tta_bands_and_a_model_transformation_carried_into_the_mask(tiny_run, tmp_path):
    rng = np.random.default_rng(5)
    five = rng.integers(0, 256, (40, 56, 5)).astype(np.uint8)  # five bands: no alpha to guess at
    write_tiff(tmp_path / "five.tif", five)
    m = [0.3, 0.1, 0, 400000.0, -0.05, -0.3, 0, 3000000.0, 0, 0, 0, 0, 0, 0, 0, 1]
    save_geotiff(tmp_path / "turned.tif", five[..., :3], geotiff_tags(m))
    model = fold_batch_norm(copy.deepcopy(tiny_run[0])).eval()
    base = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--device", "cpu", "--precision", "fp32"]
    for extra, image in [([], five[..., :3]), (["--bands", "4,2,1"], five[..., [3, 1, 0]]),
                         (["--tta"], five[..., :3])]:
        out = tmp_path / "_".join(extra or ["plain"])
        assert predict.main(base + [str(tmp_path / "five.tif"), "--out", str(out)] + extra) == 0
        image = np.ascontiguousarray(image)
        expected = predict.predict_mask(model, image, torch.float32, tta="--tta" in extra)
        assert np.array_equal(np.array(Image.open(out / "five_mask.png")), expected), extra
    assert predict.main(base + [str(tmp_path / "turned.tif"), "--out", str(tmp_path / "t")]) == 0
    mask = Image.open(tmp_path / "t" / "turned_mask.tif")
    assert mask.tag_v2[34264] == tuple(m) and 33922 not in mask.tag_v2


def test_training_with_bands_keeps_them_for_predict(tiny, tmp_path):
    root = tmp_path / "set"
    names, colours = layout.read_classes(tiny)
    _, images, masks = tile_masks(tiny, [1, 2], colours)
    for i, (image, mask) in enumerate(zip(images[:2], masks[:2])):
        (root / "images").mkdir(parents=True, exist_ok=True)
        write_tiff(root / "images" / f"{i}.tif", np.dstack([image[..., ::-1], image[..., :1]]))  # B, G, R, R
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.array(colours, np.uint8)[np.minimum(mask, 4)]).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text((tiny / "classes.json").read_text())
    train.main(tiny_args(root, tmp_path / "run", "--bands", "3,2,1", "--val-images", "1"))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["bands"] == [3, 2, 1]
    out = tmp_path / "out"
    args = ["--ckpt", str(tmp_path / "run" / "ckpt.pt"), str(root / "images" / "0.tif"), "--device", "cpu",
            "--precision", "fp32"]
    assert predict.main(args + ["--out", str(out)]) == 0  # the run's bands, unless --bands says otherwise
    assert predict.main(args + ["--out", str(tmp_path / "again"), "--bands", "3,2,1"]) == 0
    assert np.array_equal(np.array(Image.open(out / "0_mask.png")), np.array(Image.open(tmp_path / "again" /
                                                                                       "0_mask.png")))


def test_predict_never_writes_over_maps_nor_over_filled_in_suggestions(tiny_run, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "a.png"), "--out", str(out), "--precision",
            "fp32", "--suggest", "2"]
    assert predict.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert command_line(predict.main, args) == 2  # a second run into the same folder: refused, unchanged
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    lines = (out / "suggestions.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",,", ",Water,", 1)  # a person fills in one class
    (out / "suggestions.csv").write_text("\n".join(lines) + "\n")
    filled = (out / "suggestions.csv").read_bytes()
    assert command_line(predict.main, args + ["--overwrite"]) == 2  # whatever the flag says
    assert predict.main(args[:-2] + ["--overwrite"]) == 0  # maps written over, the suggestions left alone
    assert (out / "suggestions.csv").read_bytes() == filled


def test_a_full_disk_leaves_no_part_of_a_map_and_an_old_sample_is_not_left_beside_new_maps(
        tiny_run, tmp_path, monkeypatch, capsys):
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3)).astype(np.uint8)
    for name in "ab":
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out",
            str(out), "--precision", "fp32"]
    save = Image.Image.save

    def full(picture, fp, *a, **k):  # the disk fills up while the first overlay is written
        if "overlay" in str(fp):
            Path(fp).write_bytes(b"\xff\xd8 half a JPEG")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(picture, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", full)
    assert command_line(predict.main, args) == 2
    said = capsys.readouterr()
    assert re.search(r"error: \S+a_overlay.jpg: cannot be written \(No space left on device; [\d,]+ MB free "
                     r"there\)\n$", said.err) and "skipped" not in said.out  # one line, and the command stops
    # whole files: no overlay
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_mask.qml", "classes.json"]
    monkeypatch.undo()
    assert predict.main(args + ["--overwrite"]) == 0
    (out / "sample.csv").write_text("image,x,y,class,sample\n")  # assess.py's sample of these maps
    assert command_line(predict.main, args + ["--overwrite"]) == 2
    assert "holds an accuracy sample of its maps (sample.csv)" in capsys.readouterr().err


def test_names_that_begin_like_a_formula_are_written_as_text(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run[1] / "ckpt.pt", weights_only=True)
    ckpt["classes"] = ['=HYPERLINK("http://evil.example","x")', "+1", "-land", "@sum", "Vegetation"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "=a.png")
    out = tmp_path / "maps"
    assert predict.main(["--ckpt", str(tmp_path / "ckpt.pt"), str(tmp_path / "=a.png"), "--out", str(out),
                         "--precision", "fp32", "--suggest", "3"]) == 0
    for name in ("areas.csv", "suggestions.csv"):
        cells = [c for row in csv.reader(open(out / name)) for c in row]
        formulas = [c for c in cells if c and c[0] in "=+@" or c[:1] == "-" and not re.match(r"-[\d.]+$", c)]
        assert not formulas
    classes, images = assess.read_areas(out)  # read back as written
    assert classes == ckpt["classes"] and images[0][0].endswith("=a.png")
