"""The baseline a field user would run on the same clicks (PROTOCOL.md): a per-pixel random forest, as in
QGIS's Semi-Automatic Classification Plugin or Earth Engine, trained on exactly a run's points.csv and
scored on the run's validation images as train.py scores the U-Net.

    pip install scikit-learn scipy
    python -m tools.forest runs/NAME                # prints the scores, writes runs/NAME/forest.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import predict
import train
from support import clicks, layout, runs
from support.cli import DataError, command_line

WINDOWS = (3, 7, 15)  # sides of the neighbourhoods whose mean and standard deviation each pixel gets
TREES = 200


def features(image):
    """(H, W, bands) image -> (H, W, 7 * bands) float32: each band's value, and its mean and standard
    deviation in 3x3, 7x7 and 15x15 windows (mirrored at the edges): colour, and a little texture."""
    from scipy.ndimage import uniform_filter

    x = image.astype(np.float64)  # E[x^2] - E[x]^2 in float32 would lose the small variances
    out = [x]
    for side in WINDOWS:
        mean = uniform_filter(x, size=(side, side, 1))  # (side, side, 1): each band on its own
        square = uniform_filter(x * x, size=(side, side, 1))
        out += [mean, np.sqrt(np.maximum(square - mean * mean, 0))]  # max: rounding can dip below 0
    return np.concatenate(out, axis=2).astype(np.float32)


def forest_map(forest, image):
    """(H, W, bands) image -> (H, W) uint8 class map, a pixel at a time."""
    x = features(image)
    return forest.predict(x.reshape(-1, x.shape[2])).reshape(image.shape[:2]).astype(np.uint8)


def read_points(path, names):
    """A run's points.csv (clicks.write_points') -> {image index: (ys, xs, classes)}, the index into
    `names`."""
    by_image = {}
    for row in clicks.read_table(path)[0]:
        point = int(row["y"]), int(row["x"]), int(row["class"])
        by_image.setdefault(names.index(row["image"]), []).append(point)
    return {i: tuple(np.array(column) for column in zip(*rows)) for i, rows in by_image.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description="A random forest on a run's points, scored like the run.")
    p.add_argument("run", help="a run folder of train.py (its ckpt.pt and points.csv)")
    p.add_argument("--data", help="the run's data set, if it has moved since (default: the run's --data)")
    p.add_argument("--out", help="where the scores go (default: RUN/forest.json)")
    args = p.parse_args(argv)
    try:
        from sklearn.ensemble import RandomForestClassifier
        import scipy  # noqa: F401 (features)
    except ImportError:
        raise DataError("the forest needs scikit-learn and scipy: pip install scikit-learn scipy")
    run = Path(args.run)
    if not (run / "points.csv").exists():
        raise DataError(f"{run}: no points.csv (a run from dense masks, --points 0, has no points)")
    settings = runs.read_checkpoint(run / "ckpt.pt")["args"]
    # the run's settings over the defaults of today's train.py (a flag newer than the run: its default)
    run_args = argparse.Namespace(**{**vars(train.get_args([])), **settings})
    run_args.data = args.data or run_args.data or runs.find_data(run_args, 0, 1)
    d = layout.run_data(run_args, run_args.data)  # the images, bands and split the run had

    t0 = time.time()  # features of the clicked pixels, and the forest fitted on them
    points = read_points(run / "points.csv", d["names"])
    x, y = [], []
    for i, (ys, xs, classes) in points.items():
        x.append(features(d["images"][i])[ys, xs])
        y.append(classes)
    forest = RandomForestClassifier(n_estimators=TREES, n_jobs=-1, random_state=run_args.seed)
    forest.fit(np.concatenate(x), np.concatenate(y))
    t1 = time.time()  # every validation pixel mapped, and scored with predict.py's functions
    s, n = {}, len(d["classes"])
    for dense in (True, False):  # dense masks and held-out clicks, as train.validate
        part = [(image, truth) for _, image, _, truth, is_dense in d["val"] if is_dense == dense]
        if part:
            conf = sum(predict.confusion(truth, forest_map(forest, image), n) for image, truth in part)
            s.update((predict.scores if dense else predict.click_scores)(conf, d["classes"]))
    t2 = time.time()
    if not s:
        raise DataError(f"{run}: the run has no validation image to score the forest on")

    n_points = sum(len(c) for *_, c in points.values())
    print(f"random forest of {TREES} trees on {n_points} points of {len(points)} images, {x[0].shape[1]} "
          f"features; fitted in {t1 - t0:.0f}s, mapped in {t2 - t1:.0f}s")
    if "miou" in s:
        predict.print_scores(s)
    if "click_accuracy" in s:
        print(f"  held-out clicks {s['click_count']}: accuracy {s['click_accuracy']:.3f}")
    s.update(trees=TREES, seed=run_args.seed, seconds={"fit": t1 - t0, "map": t2 - t1, "total": t2 - t0})
    out = Path(args.out or run / "forest.json")
    out.write_text(json.dumps(s, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    sys.exit(command_line(main))
