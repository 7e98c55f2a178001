"""Simulated annotators, to ask which kind of label buys the most per minute of a person's time: with the
dense masks as the annotator, each patch of the grid gets points, strokes or small polygons worth the
same simulated time, written as a label file for train.py's --point-labels, the path real labels take.

    python simulate.py --data DUBAI --tiles 1,2,3,4,5,6 --kind strokes --seconds 24 --seed 0 --out s.csv
    python train.py --data DUBAI --train-tiles 1,2,3,4,5,6 --val-tiles 7 --point-labels s.csv --seed 0

Seconds per label from Bearman et al. 2016, "What's the point: semantic segmentation with point
supervision" (ECCV), measured on PASCAL VOC: 2.4 s a point click, 10.9 s a squiggle (our stroke). A small
polygon is not in their table; we count each of its 6 vertices as a click, 14.4 s: between a squiggle and
the 79 s they cite for outlining a whole object (COCO's polygons). An upper figure: after the first
vertex a person needs no new search for a place and no new decision on the class.
"""
import argparse
import csv
import math
import os
import sys
from pathlib import Path

import numpy as np

import data
from support import layout, shapes
from support.cli import DataError, check_writable, command_line, tile_list
from support.runs import find_data

VERTICES = 6  # of a polygon
SECONDS = {"points": 2.4, "strokes": 10.9, "polygons": round(VERTICES * 2.4, 1)}  # a label, see above
STROKE_LENGTH = (20, 60)  # pixels: a stroke's length, drawn uniformly; it ends early where it must
STEP = 5  # pixels from one position of a stroke to the next
RADIUS = (6, 24)  # pixels: a polygon's size, drawn uniformly, then shrunk until it fits in its class
TRIES = 20  # starting pixels tried for one label before its patch goes without it


def simulate(masks, kind, seconds, patch, line_width, seed):
    """Dense masks -> (labels [(image index, positions [(x, y)], class)], patches with a class, labels
    that found no place). Each grid patch with a class gets `seconds` of annotator time; what a patch
    cannot spend on a whole label passes to the next, so the labels' time adds up to the budget. Points
    are drawn by data.sample_points (as train.py --points draws them), strokes are random walks and
    polygons blobs that stay inside the class of their first pixel."""
    cost = SECONDS[kind]
    patches = sum((m[y0 : y0 + patch, x0 : x0 + patch] != data.IGNORE).any() for m in masks
                  for y0 in data.grid(m.shape[0], patch) for x0 in data.grid(m.shape[1], patch))
    if kind == "points":
        n = math.floor(seconds / cost + 1e-9)
        points, short = data.sample_points(masks, patch, n, seed)
        return [(i, [(x, y)], c) for i, x, y, c in points], patches, patches * n - len(points)
    draw = draw_stroke if kind == "strokes" else draw_polygon
    rng, labels, lost, carry = np.random.default_rng(seed), [], 0, 0.0
    for i, mask in enumerate(masks):
        for y0 in data.grid(mask.shape[0], patch):
            for x0 in data.grid(mask.shape[1], patch):
                ys, xs = np.nonzero(mask[y0 : y0 + patch, x0 : x0 + patch] != data.IGNORE)
                if not len(ys):
                    continue
                n = math.floor((carry + seconds) / cost + 1e-9)
                carry += seconds - n * cost
                for _ in range(n):
                    for _ in range(TRIES):
                        k = rng.integers(len(ys))
                        x, y = int(x0 + xs[k]), int(y0 + ys[k])
                        positions = draw(mask, x, y, rng, line_width)
                        if positions:
                            labels.append((i, positions, int(mask[y, x])))
                            break
                    else:
                        lost += 1
    return labels, patches, lost


def draw_stroke(mask, x, y, rng, line_width):
    """A random walk from pixel (x, y) whose line stays in that pixel's class -> its positions, or None
    where not even one step fits."""
    size, c = mask.shape[::-1], mask[y, x]
    length, heading, walked, at = rng.uniform(*STROKE_LENGTH), rng.uniform(0, 2 * np.pi), 0.0, [(x, y)]
    while walked < length:
        heading += rng.normal(0, 0.5)  # a gently curving line
        for turn in [0, 0.5, -0.5, 1, -1, 1.5, -1.5]:  # the straightest step that stays in the class
            (px, py), a = at[-1], heading + turn
            q = (round(px + STEP * math.cos(a)), round(py + STEP * math.sin(a)))
            step = shapes.line_pixels(np.array([(px, py), q], float), line_width, size)
            if q != (px, py) and inside(mask, step, c):
                break
        else:
            break  # boxed in: the stroke ends here
        heading, walked = a, walked + math.dist((px, py), q)
        at.append(q)
    return at if len(at) > 1 else None


def draw_polygon(mask, x, y, rng, line_width=None):
    """A blob of VERTICES corners around pixel (x, y), shrunk until every pixel it labels is of that
    pixel's class -> its corners, or None where even a small one does not fit."""
    (w, h), c = mask.shape[::-1], mask[y, x]
    angles = (np.arange(VERTICES) + rng.uniform(-0.3, 0.3, VERTICES)) * 2 * np.pi / VERTICES
    angles += rng.uniform(0, 2 * np.pi)
    spread, radius = rng.uniform(0.6, 1.0, VERTICES), rng.uniform(*RADIUS)
    while radius >= 2:
        ring = np.round(np.stack([x + radius * spread * np.cos(angles), y + radius * spread * np.sin(angles)],
                                 axis=1))
        on_image = (ring >= 0).all() and (ring[:, 0] < w).all() and (ring[:, 1] < h).all()
        if on_image and inside(mask, shapes.polygon_pixels([np.vstack([ring, ring[:1]])], (w, h)), c):
            return [(int(a), int(b)) for a, b in ring]
        radius *= 0.7
    return None


def inside(mask, pixels, c):
    cols, rows = pixels
    return len(cols) > 0 and bool((mask[rows, cols] == c).all())


def labelled_pixels(labels, masks, kind, line_width):
    """How many pixels the labels cover, each once: what train.py will count."""
    covered = [set() for _ in masks]
    for i, positions, _ in labels:
        xy, size = np.array(positions, float), masks[i].shape[::-1]
        if kind == "strokes":
            cols, rows = shapes.line_pixels(xy, line_width, size)
        elif kind == "polygons":
            cols, rows = shapes.polygon_pixels([np.vstack([xy, xy[:1]])], size)
        else:
            cols, rows = xy[:, 0].astype(int), xy[:, 1].astype(int)
        covered[i] |= set((rows * size[0] + cols).tolist())
    return sum(map(len, covered))


def write_labels(path, labels, names, classes, kind):
    """The labels -> CSV image,x,y,class, and for strokes and polygons the column `stroke` or `polygon`
    whose number ties a label's rows together (clicks.read_csv). Written whole, then renamed."""
    column = {"strokes": ["stroke"], "polygons": ["polygon"]}.get(kind, [])
    partial = Path(f"{path}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class"] + column)
        for k, (i, positions, c) in enumerate(labels):
            w.writerows([names[i], x, y, classes[c]] + [k] * len(column) for x, y in positions)
    os.replace(partial, path)


def main(argv=None):
    args = get_args(argv)
    check_writable(Path(args.out).resolve().parent, "--out")
    root = Path(find_data(args, 0, 1))
    found = layout.find_images(root)  # a missing folder, or one without images, is one line
    classes, colours = layout.read_classes(root)
    if args.tiles:
        files = layout.tile_files(root, tile_list(args.tiles, []))
    else:
        files = [(n, p) for n, p, _ in found if layout.mask_path(p).exists()]
    if not files:
        raise DataError(f"{root}: no image with a mask (X/images/NAME -> X/masks/NAME.png) to simulate from")
    masks = layout.read_images(files, colours)[2]
    labels, patches, lost = simulate(masks, args.kind, args.seconds, args.patch, args.line_width, args.seed)
    write_labels(args.out, labels, [n for n, _ in files], classes, args.kind)
    spent = len(labels) * SECONDS[args.kind]
    print(f"{args.kind}: {len(labels)} labels on {patches} patches of {len(files)} images, "
          f"{labelled_pixels(labels, masks, args.kind, args.line_width)} labelled pixels; "
          f"{spent / max(patches, 1):.1f} s of annotator time per patch ({SECONDS[args.kind]} s a label, "
          f"{args.seconds} s budget); {lost} found no place; written to {args.out}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Draw simulated labels from dense masks at an equal annotator "
                                "time per patch, as a label file for train.py --point-labels.")
    add = p.add_argument
    add("--data", help="a data set with dense masks and classes.json (default: train.py's)")
    add("--tiles", default="", help="comma list of the tiles to label, e.g. 1,2,3,4,5,6 (default: every "
        "image with a mask)")
    add("--kind", default="points", choices=list(SECONDS), help="what the simulated person draws: "
        "points, strokes (random walks) or polygons (blobs), each inside one class (default: %(default)s)")
    add("--seconds", type=float, default=24.0, help="annotator time per grid patch, in seconds; 24 is 10 "
        "points, 2.2 strokes or 1.7 polygons (default: %(default)s)")
    add("--patch", type=int, default=256, help="side of the grid patches, as train.py --patch (default: "
        "%(default)s)")
    add("--line-width", type=float, default=3, help="width of the strokes in pixels; give train.py the "
        "same (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the labels drawn (default: %(default)s)")
    add("--out", default="labels.csv", help="the label file written (default: %(default)s)")
    args = p.parse_args(argv)
    for flag, ok, must in [("--seconds", 0 < args.seconds < math.inf, "more than 0"),
                           ("--patch", args.patch >= 1, "1 or more"),
                           ("--line-width", 0 < args.line_width < math.inf, "more than 0"),
                           ("--seed", 0 <= args.seed < 2**32, "from 0 to 2**32 - 1")]:
        if not ok:
            raise DataError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: must be {must}")
    return args


if __name__ == "__main__":
    sys.exit(command_line(main))
