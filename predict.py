"""Full-resolution inference and scoring: a blended sliding window over images of any size, colour
masks and overlays, and per-class IoU / mIoU / pixel accuracy against dense masks.

    python predict.py --ckpt RUN/ckpt.pt IMAGE_OR_FOLDER... --out DIR
    python predict.py --ckpt RUN/ckpt.pt --data ROOT --tiles 7 --out DIR
"""
import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import scene
from cli import DataError, check_writable, command_line, tile_list
from model import load_checkpoint, to_input
from speed import fold_batch_norm, keep_freed_memory, pick_device, pick_dtype

WINDOW = 1536  # largest window side; windows get smaller to fit the image with little waste
OVERLAP = 64  # pixels shared by neighbouring windows, where their logits are blended
STRIDE = 32  # the encoder's total stride: windows start on its grid, as in a whole-image pass


def window_starts(size, window, overlap):
    """-> (starts, side): the fewest windows of one side (a multiple of STRIDE, at most
    `window`) that cover [0, size) overlapping by `overlap`, starting at multiples of STRIDE."""
    n = 1 if size <= window else math.ceil((size - overlap) / (window - overlap))
    side = math.ceil(math.ceil((size + (n - 1) * overlap) / n) / STRIDE) * STRIDE
    return [i * (side - overlap) for i in range(n)], side


def ramp(side, overlap, device):
    """Blending weight along one side of a window: rises over the overlap from near 0 to 1, so a
    window's edge, where it sees least context, counts least."""
    i = torch.arange(side, device=device, dtype=torch.float32)
    return torch.minimum((i + 0.5) / overlap, (side - i - 0.5) / overlap).clamp(max=1)


def dihedral_mean(model, x):
    """Test-time augmentation: the mean of the logits of x (B, 3, H, W) over its 8 flips and quarter
    turns, each turned back before it is added, so the prediction no longer depends on which way
    the scene is turned. 8 forward passes instead of one."""
    total = 0
    for k in range(4):
        for flip in (False, True):
            turned = torch.rot90(x, k, (2, 3))
            logits = model(turned.flip(3) if flip else turned).float()
            total = total + torch.rot90(logits.flip(3) if flip else logits, -k, (2, 3))
    return total / 8


@torch.no_grad()
def sliding_window(model, image, mean, std, dtype, window, overlap=OVERLAP, tta=False):
    """Yield the logits of an (H, W, 3) uint8 image in horizontal bands, top to bottom:
    (C, rows, W) float32 on the model's device. Only one band of windows is held at a time, so
    this memory is bounded by the window and the image width, not by the image's height. The
    caller lets go of a band before asking for the next."""
    device = next(model.parameters()).device
    h, w = image.shape[:2]
    ys, wh = window_starts(h, window, overlap)
    xs, ww = window_starts(w, window, overlap)
    weight = ramp(wh, overlap, device)[:, None] * ramp(ww, overlap, device)[None, :]  # (wh, ww)
    width = xs[-1] + ww
    carry = None  # sums for rows that the next band of windows covers too
    for k, y in enumerate(ys):
        acc = torch.zeros(model.head.out_channels, wh, width, device=device)  # sum of weight * logits
        wsum = torch.zeros(wh, width, device=device)  # sum of weights
        if carry is not None:
            acc[:, : carry[1].shape[0]] += carry[0]
            wsum[: carry[1].shape[0]] += carry[1]
        for x in xs:
            tile = image[y : y + wh, x : x + ww]
            if tile.shape[:2] != (wh, ww):  # past the image's bottom or right edge: mirror it
                pad = ((0, wh - tile.shape[0]), (0, ww - tile.shape[1]), (0, 0))
                tile = np.pad(tile, pad, mode="symmetric")
            batch = to_input(torch.from_numpy(tile.copy())[None].to(device), mean, std)  # copy: writable
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = (dihedral_mean(model, batch) if tta else model(batch))[0].float()  # (C, wh, ww)
            acc[:, :, x : x + ww] += logits * weight
            wsum[:, x : x + ww] += weight
        done = ys[k + 1] - y if k + 1 < len(ys) else wh  # rows no later window touches
        carry = (acc[:, done:].clone(), wsum[done:].clone())  # copies: acc itself can go
        rows = min(done, h - y)
        band = acc[:, :rows, :w]
        band /= wsum[:rows, :w]  # in place: a large scene's band is hundreds of megabytes
        del acc, wsum
        yield band


def predict_mask(model, image, mean, std, dtype, window=None, progress=False, tta=False):
    """(H, W, 3) uint8 image -> (H, W) uint8 class map. With `progress`, a scene that takes several
    bands of windows gets a line after each: rows done, speed, time left."""
    h, w = image.shape[:2]
    pred, done, t0 = np.empty((h, w), np.uint8), 0, time.time()
    for band in sliding_window(model, image, mean, std, dtype, window or WINDOW, tta=tta):
        # max(0).indices is the argmax, computed several times faster than argmax(0) on CPU
        pred[done : done + band.shape[1]] = band.max(0).indices.to(torch.uint8).cpu().numpy()
        done += band.shape[1]
        del band  # before the next band is made
        if progress and done < h:
            speed = done * w / 1e6 / (time.time() - t0)
            left = (h - done) * w / 1e6 / speed
            print(f"  rows {done}/{h}  {speed:.2f} MP/s  {left:.0f}s left", flush=True)
    return pred


def confusion(truth, pred, num_classes):
    """Confusion matrix, rows = truth, columns = prediction, over pixels whose truth has a class."""
    keep = truth != data.IGNORE
    idx = truth[keep].astype(np.int64) * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(conf, names):
    """Per-class IoU, their mean and pixel accuracy. A class absent from both truth and
    prediction has no IoU (None) and stays out of the mean."""
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = {n: (float(t / u) if u else None) for n, t, u in zip(names, tp, union)}
    present = [v for v in iou.values() if v is not None]
    return {
        "miou": float(np.mean(present)) if present else 0.0,
        "iou": iou,
        "pixel_acc": float(tp.sum() / max(conf.sum(), 1)),
        "confusion": conf.tolist(),
    }


def colourize(classes, colours):
    """(H, W) class map -> palette image in the data set's colours (IGNORE shows black)."""
    im = Image.fromarray(classes, mode="P")
    im.putpalette([v for c in colours for v in c] + [0, 0, 0] * (256 - len(colours)))
    return im


def side_by_side(panels):
    """Pictures of one size -> one picture, left to right, 10 white pixels apart."""
    w, h = panels[0].size
    sheet = Image.new("RGB", (len(panels) * (w + 10) - 10, h), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel.convert("RGB"), (i * (w + 10), 0))
    return sheet


def compare(image, pred, truth, colours, height=512):
    """image | prediction | truth | errors (red: wrong, white: right, black: no class), scaled."""
    errors = np.full(truth.shape + (3,), 255, np.uint8)
    errors[pred != truth] = (220, 30, 30)
    errors[truth == data.IGNORE] = 0
    size = (round(image.shape[1] * height / image.shape[0]), height)
    pictures = [Image.fromarray(image).resize(size, Image.BILINEAR)]  # the classes: nearest, no blend
    pictures += [p.resize(size, Image.NEAREST) for p in (colourize(pred, colours), colourize(truth, colours),
                                                          Image.fromarray(errors))]
    return side_by_side(pictures)


def evaluate(model, meta, images, masks, dtype, names=None, out=None, tta=False):
    """Score whole images against their dense masks -> scores() dict. `meta` holds the classes,
    colours, mean and std (as a checkpoint does). With `out`, also print one line per image and
    write a side-by-side picture of each, named after `names`."""
    conf = 0
    for i, (image, mask) in enumerate(zip(images, masks)):
        t0 = time.time()
        pred = predict_mask(model, image, meta["mean"], meta["std"], dtype, tta=tta)
        conf = conf + confusion(mask, pred, len(meta["classes"]))
        if out is not None:
            stem = names[i].replace("/", "_").rsplit(".", 1)[0]
            compare(image, pred, mask, meta["colours"]).save(Path(out) / f"{stem}_compare.png")
            print(f"{names[i]}  {image.shape[1]}x{image.shape[0]}  {time.time() - t0:.1f}s")
    return scores(conf, meta["classes"])


def print_scores(s):
    for name, v in s["iou"].items():
        print(f"  {name:<24} IoU {'  -  ' if v is None else f'{v:.3f}'}")
    absent = [n for n, v in s["iou"].items() if v is None]
    note = f" (left out, in neither truth nor prediction: {', '.join(absent)})" if absent else ""
    print(f"  mIoU {s['miou']:.3f}  pixel accuracy {s['pixel_acc']:.3f}{note}")


def image_files(inputs):
    """Images and folders of images -> list of image paths, each once (folders are not searched
    recursively)."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in data.IMAGE_SUFFIXES)
        else:
            files.append(p)
    return list({f.resolve(): f for f in files}.values())


def band_list(text):
    """'4,3,2' -> [4, 3, 2]: the bands to map as red, green, blue (or one band, as grey)."""
    try:
        bands = [int(b) for b in text.split(",")]
    except ValueError:
        bands = []
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise DataError(f"--bands {text}: expected 1 or 3 band numbers from 1, e.g. 4,3,2")
    return bands


def map_scene(model, meta, dtype, path, stem, bands, tta=False):
    """Map one scene and write its mask and overlay -> (class areas rows, paths written, (w, h))."""
    s = scene.read_scene(path, bands)
    if s["note"]:
        print(f"{path}: {s['note']}")
    pred = predict_mask(model, s["rgb"], meta["mean"], meta["std"], dtype, progress=True, tta=tta)
    if s["valid"] is not None:  # no data: no class, black in the mask, left out of the areas
        pred[~s["valid"]] = data.IGNORE
    geo = s["geo"]
    written = [scene.write_mask(colourize(pred, meta["colours"]), stem, geo)]
    written.append(scene.write_overlay(s["rgb"], pred, meta["colours"], stem, geo))
    return scene.class_areas(pred, meta["classes"], geo and geo["pixel_m2"]), written, pred.shape[::-1]


def main(argv=None):
    p = argparse.ArgumentParser(description="Map images with a trained model, or score it on dense masks.")
    p.add_argument("inputs", nargs="*", help="images (any format Pillow reads) or folders of images to map")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. runs/NAME/ckpt.pt")
    p.add_argument("--data", default=None, help="a data set in the Kaggle layout whose --tiles are scored")
    p.add_argument("--tiles", default="", help="comma list of the tiles of --data to score (default: last)")
    p.add_argument("--out", default="predictions",
                   help="folder for masks, overlays, areas.csv, scores and pictures (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda, else mps, when present), 'cpu', 'cuda', ... (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="'auto' times both on this machine and takes the faster (default: %(default)s)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the 8 flips and quarter turns (8 times slower)")
    p.add_argument("--bands", default="", help="bands to map as red,green,blue, counted from 1, e.g. 4,3,2 "
                   "(default: the first three)")
    args = p.parse_args(argv)
    if not args.inputs and not args.data:
        p.error("give images or folders to map, or --data (and --tiles) to score")
    bands = band_list(args.bands) if args.bands else None
    out = Path(args.out)
    check_writable(out, "--out")
    keep_freed_memory()
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.ckpt, device)
    model = fold_batch_norm(model)  # inference only: batch norm becomes part of each convolution
    dtype = pick_dtype(args.precision, device, model, train=False)
    legend = zip(meta["classes"], meta["colours"])
    print("legend: " + ", ".join(f"{n} #{r:02X}{g:02X}{b:02X}" for n, (r, g, b) in legend))

    if args.data:
        names, colours = data.read_classes(args.data)
        if (names, colours) != (meta["classes"], [tuple(c) for c in meta["colours"]]):
            raise DataError(f"{args.data}/classes.json: its classes differ from those of {args.ckpt}")
        tiles = tile_list(args.tiles, list(data.list_tiles(args.data))[-1:])
        img_names, images, masks = data.load_tiles(args.data, tiles, colours)
        s = evaluate(model, meta, images, masks, dtype, names=img_names, out=out, tta=args.tta)
        print(f"scores on tiles {','.join(map(str, tiles))} of {args.data}:")
        print_scores(s)
        (out / "metrics.json").write_text(json.dumps(s, indent=1))

    files = image_files(args.inputs)
    stems, note = scene.output_stems(files)
    if note:
        print(note)
    failed, areas = [], []
    for path, stem in zip(files, stems):
        t0 = time.time()
        try:
            rows, written, (w, h) = map_scene(model, meta, dtype, path, out / stem, bands, args.tta)
        except DataError as e:
            print(f"skipped: {e}")
            failed.append(path)
            continue
        areas += [(path, *row) for row in rows]
        dt = time.time() - t0
        print(f"{path}  {w}x{h}  {dt:.1f}s  {w * h / 1e6 / dt:.2f} MP/s  -> {', '.join(map(str, written))}")
    if areas:
        with open(out / "areas.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "class", "pixels", "share", "hectares"), *areas])
    if failed:
        print(f"{len(failed)} of the inputs could not be read: " + ", ".join(map(str, failed)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(command_line(main))
