"""Data sets: tiles and folders, masks and their colours, what a run refuses before it writes."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import COLOURS, FIXTURES, classes_json, tiny_args, write_set
from support import layout
from support.cli import DataError, command_line


def test_reader_palette_masks_unknown_colours_and_missing_masks(tmp_path, capsys):
    truth = np.array([[0, 1, 2, 1], [2, 2, 0, 9]], np.uint8)  # 9: black, in no class
    pal = Image.fromarray(truth, mode="P")
    pal.putpalette([v for c in COLOURS for v in c] + [0] * 3 * 6 + [0, 0, 0])
    rgb = np.array(COLOURS + [(0, 0, 0)] * 7, np.uint8)[truth]
    image = np.zeros((2, 4, 3), np.uint8)
    files = {"Tile 1/images/a.jpg": (image, pal), "Tile 2/images/b.png": (image, Image.fromarray(rgb))}
    root = write_set(tmp_path / "set", classes_json(), files)
    files = layout.tile_files(root, [1, 2])
    images, valids, masks = layout.read_images(files, COLOURS)
    expected = np.where(truth == 9, data.IGNORE, truth)
    assert [n for n, _ in files] == ["Tile 1/images/a.jpg", "Tile 2/images/b.png"]
    assert np.array_equal(masks[0], expected) and np.array_equal(masks[1], expected)
    assert "2 mask pixels have a colour in no class" in capsys.readouterr().out
    Image.fromarray(image).save(root / "Tile 1" / "images" / "c.jpg")  # no mask
    with pytest.raises(DataError, match="c.jpg: has no mask"):
        layout.read_images(layout.tile_files(root, [1]), COLOURS)


def test_index_masks_and_masks_that_match_no_class(tmp_path, capsys):
    classes = json.loads((FIXTURES / "classes.json").read_text())
    colours = [layout.hex_to_rgb(c["color"]) for c in classes["classes"]]
    index = np.array(Image.open(FIXTURES / "scene_index_mask.png"))
    mask, unknown = layout.read_mask(FIXTURES / "scene_index_mask.png", colours, index.shape)
    assert np.array_equal(mask, index) and unknown == 0 and index.max() == 4  # LandCover.ai's layout
    grey = [(0, 0, 0), (255, 255, 255)]  # a black and white mask of classes.json colours stays colours
    Image.fromarray(np.where(index > 2, 255, 0).astype(np.uint8)).save(tmp_path / "bw.png")
    assert np.array_equal(layout.read_mask(tmp_path / "bw.png", grey, index.shape)[0], (index > 2))
    capsys.readouterr()
    mask, unknown = layout.read_mask(FIXTURES / "scene_colour_mask_via_jpeg.png", colours, index.shape)
    said = capsys.readouterr().out
    assert "scene_colour_mask_via_jpeg.png: only 1% of the mask's pixels have a colour of classes" in said
    assert "saved as JPEG" in said and unknown > 0.9 * mask.size


def test_a_run_with_no_label_is_refused_and_writes_nothing(tiny, tmp_path, capsys):
    root = tmp_path / "set"
    shutil.copytree(tiny, root)
    for mask in root.glob("Tile */masks/*.png"):  # the masks of another palette: no pixel matches
        Image.fromarray(255 - np.array(Image.open(mask).convert("RGB"))).save(mask)
    out = tmp_path / "run"
    assert command_line(train.main, tiny_args(root, out)) == 2 and not out.exists()
    assert capsys.readouterr().err.startswith("error: no training pixel has a label")


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "holds no images"),
        ("no classes.json", "classes.json: not found"),
        ("classes.json unparsable", "classes.json: not a list of classes"),
        ("classes without colours", "classes.json: not a list of classes"),
        ("colour not #RRGGBB", "colour '#12345' is not of the form #RRGGBB"),
        ("mask of another size", "a.png: mask is 5x4, its image is 6x4"),
        ("truncated image", "a.jpg: cannot read image"),
        ("no such tile", "has no Tile 9"),
        ("tiles not numbers", "tiles 'one': expected tile numbers"),
    ],
)
def test_bad_data_sets(tmp_path, case, message):
    image, mask = np.full((4, 6, 3), 128, np.uint8), Image.new("RGB", (6, 4), COLOURS[0])
    classes, tiles = classes_json(), "1"
    if case == "no classes.json":
        classes = None
    elif case == "classes.json unparsable":
        classes = "{not json"
    elif case == "classes without colours":
        classes = json.dumps({"classes": [{"title": "water"}]})
    elif case == "colour not #RRGGBB":
        classes = json.dumps({"classes": [{"title": "water", "color": "#12345"}]})
    elif case == "mask of another size":
        mask = Image.new("RGB", (5, 4), COLOURS[0])
    elif case == "no such tile":
        tiles = "9"
    elif case == "tiles not numbers":
        tiles = "one"
    files = {} if case == "empty folder" else {"Tile 1/images/a.jpg": (image, mask)}
    root = write_set(tmp_path / "set", classes or "", files)
    if classes is None:
        (root / "classes.json").unlink()
    if case == "truncated image":
        path = root / "Tile 1" / "images" / "a.jpg"
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        train.main(["--data", str(root), "--out", str(tmp_path / "run"), "--train-tiles", tiles,
                    "--val-tiles", tiles])


def test_small_images_are_padded_and_big_point_counts_capped(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def image_and_mask(h, w):
        return rng.integers(0, 255, (h, w, 3)).astype(np.uint8), Image.fromarray(
            np.array(COLOURS, np.uint8)[rng.integers(0, 3, (h, w))])

    files = {"Tile 1/images/a.png": image_and_mask(40, 50), "Tile 1/images/b.png": image_and_mask(64, 70),
             "Tile 2/images/a.png": image_and_mask(40, 50)}
    root = write_set(tmp_path / "set", classes_json(), files)
    train.main(tiny_args(root, tmp_path / "run", "--points", "5000"))
    said = capsys.readouterr().out
    assert said.count("fewer labelled pixels") == 1 and "epoch 1/1" in said
    assert "--patch 64: 1 of 2 training images are smaller and are padded" in said
    rows = [r.split(",") for r in (tmp_path / "run" / "points.csv").read_text().splitlines()[1:]]
    assert len(rows) == 40 * 50 + 64 * 70  # every pixel of the two images, each once
    shapes = {"Tile 1/images/a.png": (40, 50), "Tile 1/images/b.png": (64, 70)}
    assert {(n, int(x), int(y)) for n, x, y, _ in rows} == {(n, x, y) for n, (h, w) in shapes.items()
                                                           for y in range(h) for x in range(w)}


def test_validating_on_a_training_tile_warns_once_and_trains(tiny, tmp_path, capsys):
    train.main(tiny_args(tiny, tmp_path / "run", "--train-tiles", "1,2", "--val-tiles", "2"))
    said = capsys.readouterr().out
    assert said.count("warning: validation tile(s) 2 are also trained on") == 1
    outputs = ["ckpt.pt", "metrics.json", "classes.json", "panel.png", "points.csv", "points.jpg"]
    assert said.splitlines()[-1] == "done: " + ", ".join(str(tmp_path / "run" / f) for f in outputs)


def test_points_csv_is_checked_and_used(tiny, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("image,x,y,class\nTile 1/images/image_part_001.jpg,50,60,1\n"
                    "Tile 3/images/image_part_001.jpg,5,5,0\n")
    train.main(tiny_args(tiny, tmp_path / "run", "--point-labels", str(good), "--lr-schedule", "constant",
                         "--class-weights", "none"))
    optimizer = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == 1e-3
    # the row of Tile 3 (validation, not trained on) is skipped; the one point is the one trained on
    trained = (tmp_path / "run" / "points.csv").read_text().splitlines()[1:]
    assert trained == ["Tile 1/images/image_part_001.jpg,50,60,1"]
    for row, message in [
        ("Tile 1/images/nope.jpg,1,1,0", "unknown image"),
        ("Tile 1/images/image_part_001.jpg,96,1,0", r"point \(96, 1\) is outside"),
        ("Tile 1/images/image_part_001.jpg,1,1,7", "class '7' is not in classes.json"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text("image,x,y,class\n" + row + "\n")
        with pytest.raises(DataError, match=message):
            train.main(tiny_args(tiny, tmp_path / "bad", "--point-labels", str(bad)))


def test_partial_masks_and_scribbles_train_as_they_are_with_points_0(tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = {}
    for t in (1, 2):
        mask = np.zeros((64, 64, 3), np.uint8)  # black: a colour in no class, so no label
        mask[10:12, 5:50] = COLOURS[0]  # a scribble of class 0
        mask[40:44, 30:34] = COLOURS[2]  # a dab of class 2
        image = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
        files[f"Tile {t}/images/a.png"] = (image, Image.fromarray(mask))
    root = write_set(tmp_path / "set", classes_json(), files)
    train.main(tiny_args(root, tmp_path / "run", "--points", "0", "--val-tiles", "2"))
    said = capsys.readouterr().out
    assert "(1 patches, 106 labelled pixels)" in said  # 2 x 45 + 4 x 4 in the one training image
    assert not (tmp_path / "run" / "points.csv").exists()  # nothing drawn: the scribbles are the labels
