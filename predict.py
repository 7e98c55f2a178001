"""Maps of whole images from the trained model, their scores, and where to click next.

The network sees windows of at most 1536x1536 pixels. An image of any size is covered by windows
that overlap by 64 pixels; each window's logits are weighted by a ramp that falls towards its edges,
where it sees least context, and the weighted sums are divided by the summed weights: no seams.

    python predict.py --ckpt RUN/ckpt.pt IMAGE_OR_FOLDER... --out DIR [--suggest 20]
    python predict.py --ckpt RUN/ckpt.pt SCENES --out DIR --aoi area.gpkg --min-area 25 --polygons --margin
    python predict.py --ckpt RUN/ckpt.pt --data ROOT --tiles 7 --out DIR     # scores on dense masks
"""
import argparse
import csv
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from data import IGNORE
from model import load_checkpoint
from support import clicks, layers, layout, maps, polygons, rasters
from support.clicks import text_cell
from support.bands import display, input_plan, model_input, to_input
from support.cli import DataError, WriteError, band_list, command_line, tile_list, written
from support.speed import fold_batch_norm, fold_upsampling, pick_device, pick_dtype

WINDOW = 1536  # largest window side; windows get smaller to fit the image with little waste
OVERLAP = 64  # rows or columns that neighbouring windows share, where their logits are blended
STRIDE = 32  # the encoder's total stride: window sides are multiples of it, as in a whole-image pass
SPACING = 32  # suggested clicks are at least this many pixels apart


@torch.no_grad()
def sliding_window(model, image, dtype, window=WINDOW, overlap=OVERLAP, tta=False, norm="imagenet"):
    """(H, W, bands) image -> (C, H, W) float32 logits, from overlapping windows blended by ramps. norm:
    how the image's samples are normalised (support.bands.to_input)."""
    device = next(model.parameters()).device
    h, w = image.shape[:2]
    ys, wh = window_starts(h, window, overlap)
    xs, ww = window_starts(w, window, overlap)
    weight = ramp(wh, overlap, device)[:, None] * ramp(ww, overlap, device)[None, :]  # (wh, ww)
    # windows past the bottom or right edge see the image mirrored there
    image = np.pad(image, ((0, ys[-1] + wh - h), (0, xs[-1] + ww - w), (0, 0)), mode="symmetric")
    acc = torch.zeros(model.head.out_channels, *image.shape[:2], device=device)  # sum of weight * logits
    wsum = torch.zeros(image.shape[:2], device=device)  # sum of weights
    for y in ys:
        for x in xs:
            batch = to_input(torch.from_numpy(image[None, y : y + wh, x : x + ww].copy()).to(device), norm)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = (dihedral_mean(model, batch) if tta else model(batch))[0].float()  # (C, wh, ww)
            acc[:, y : y + wh, x : x + ww] += logits * weight
            wsum[y : y + wh, x : x + ww] += weight
    return acc[:, :h, :w].div_(wsum[:h, :w])  # in place: a scene's logits can be hundreds of megabytes


def window_starts(size, window, overlap):
    """-> (starts, side): as few windows as cover [0, size) overlapping by `overlap`, each of one side
    (a multiple of STRIDE, at most `window`), the first at 0."""
    n = 1 if size <= window else math.ceil((size - overlap) / (window - overlap))  # how many windows
    side = (size + (n - 1) * overlap) / n  # the side that n windows need, before rounding
    side = math.ceil(math.ceil(side) / STRIDE) * STRIDE
    return [i * (side - overlap) for i in range(n)], side


def ramp(side, overlap, device):
    """Blending weight along one side of a window: rises over the overlap from near 0 to 1."""
    i = torch.arange(side, device=device, dtype=torch.float32)
    return torch.minimum((i + 0.5) / overlap, (side - i - 0.5) / overlap).clamp(max=1)


def dihedral_mean(model, x):
    """Test-time augmentation: the mean of the logits of x (B, bands, H, W) over its 8 flips and quarter
    turns, each turned back before it is added. 8 forward passes instead of one."""
    total = 0
    for k in range(4):
        for flip in (False, True):
            turned = torch.rot90(x, k, (2, 3))
            logits = model(turned.flip(3) if flip else turned).float()
            total = total + torch.rot90(logits.flip(3) if flip else logits, -k, (2, 3))
    return total / 8


def predict_mask(model, image, dtype, window=WINDOW, tta=False, norm="imagenet"):
    """(H, W, bands) image -> (H, W) uint8 class map."""
    logits = sliding_window(model, image, dtype, window, tta=tta, norm=norm)
    return logits.max(0).indices.to(torch.uint8).cpu().numpy()  # max(0).indices: argmax, faster on a CPU


# ---------------------------------------------------------------------------- scores


def confusion(truth, pred, num_classes):
    """Confusion matrix, rows = truth, columns = prediction, over pixels whose truth has a class."""
    keep = truth != IGNORE
    idx = truth[keep].astype(np.int64) * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(conf, names):
    """Against dense masks: per-class IoU, their mean and pixel accuracy. A class absent from both
    truth and prediction has no IoU (None) and stays out of the mean."""
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


def click_scores(conf, names):
    """Against held-out clicks: the share of clicks the map gets right, and per class precision (of
    the clicks mapped as the class, the share that are it), recall (of the clicks of the class, the
    share mapped as it) and F1 = 2 TP / (clicks mapped as it + clicks of it); None where a class has
    no click to tell. Clicks are a convenience sample: these are no accuracy of the map."""
    tp, mapped, true = np.diag(conf), conf.sum(0), conf.sum(1)

    def per_class(top, bottom):
        return {n: (float(t / b) if b else None) for n, t, b in zip(names, top, bottom)}

    return {"click_accuracy": float(tp.sum() / max(conf.sum(), 1)), "click_count": int(conf.sum()),
            "click_precision": per_class(tp, mapped), "click_recall": per_class(tp, true),
            "click_f1": per_class(2 * tp, mapped + true)}


def evaluate(model, images, truths, dtype, num_classes, tta=False, norm="imagenet"):
    """The confusion matrix of the maps of `images` against `truths` (dense masks or click maps)."""
    conf = 0
    for image, truth in zip(images, truths):
        conf = conf + confusion(truth, predict_mask(model, image, dtype, tta=tta, norm=norm), num_classes)
    return conf


def print_scores(s):
    for name, v in s["iou"].items():
        print(f"  {name:<24} IoU {'  -  ' if v is None else f'{v:.3f}'}")
    absent = [n for n, v in s["iou"].items() if v is None]
    note = f" (left out, in neither truth nor prediction: {', '.join(absent)})" if absent else ""
    print(f"  mIoU {s['miou']:.3f}  pixel accuracy {s['pixel_acc']:.3f}{note}")


# ---------------------------------------------------------------------------- where to click next


def least_sure(margin, spacing=SPACING):
    """margin: (H, W), the probability of the best class minus that of the second (inf: no data) -> the
    least sure pixel of each cell of spacing x spacing pixels: (margins, xs, ys), one per cell. Ties
    (bf16 logits often give two classes the very same value, a margin of 0) are broken at random."""
    h, w = margin.shape
    gh, gw = math.ceil(h / spacing), math.ceil(w / spacing)
    padded = np.full((gh * spacing, gw * spacing), np.inf, np.float32)
    padded[:h, :w] = margin + np.random.default_rng(0).random((h, w), np.float32) * 1e-6
    cells = padded.reshape(gh, spacing, gw, spacing).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    where = cells.argmin(1)  # the least sure pixel of each cell, counted within the cell
    cell = np.arange(gh * gw)
    return cells[cell, where], cell % gw * spacing + where % spacing, cell // gw * spacing + where // spacing


def suggest_clicks(candidates, n, spacing=SPACING):
    """The n places where the model is least sure, no two closer than `spacing` -> [(x, y)]. candidates:
    (margins, xs, ys) of least_sure, taken from the least sure up, skipping any that lies closer than
    `spacing` to one already taken."""
    margins, xs, ys = candidates
    taken = []
    for c in np.argsort(margins, kind="stable"):
        if len(taken) == n or not np.isfinite(margins[c]):
            break
        x, y = int(xs[c]), int(ys[c])
        if all((x - tx) ** 2 + (y - ty) ** 2 >= spacing**2 for tx, ty in taken):
            taken.append((x, y))
    return taken


# ---------------------------------------------------------------------------- main


def image_files(inputs):
    """Images and folders of images -> list of image paths, each once (folders are not searched
    recursively; a Sentinel-2 .SAFE folder is one image)."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir() and not layout.is_image(p):
            files += sorted(f for f in p.iterdir() if layout.is_image(f))
        else:
            files.append(p)
    return list({f.resolve(): f for f in files}.values())


def score_tiles(logits_of, meta, args, out, bands, show):
    """--data: score the model on dense masks of --tiles -> metrics.json and a comparison per image."""
    names, colours = layout.read_classes(args.data)
    if (names, colours) != (meta["classes"], [tuple(c) for c in meta["colours"]]):
        raise DataError(f"{args.data}/classes.json: its classes differ from those of {args.ckpt}")
    tiles = tile_list(args.tiles, list(layout.list_tiles(args.data))[-1:])
    conf = 0
    for name, path in layout.tile_files(args.data, tiles):
        t0 = time.time()
        s = rasters.read_scene(path)
        plan = input_plan(s["samples"].shape[2], s["samples"].dtype, meta, bands)
        image = model_input(s["samples"], s["valid"], plan)
        mask, _ = layout.read_mask(layout.mask_path(path), colours, image.shape[:2])
        if s["valid"] is not None:
            mask[~s["valid"]] = IGNORE
        pred, _ = maps.map_in_blocks(partial(logits_of, norm=plan[1]), image)
        conf = conf + confusion(mask, pred, len(names))
        stem = name.replace("/", "_").rsplit(".", 1)[0]
        shown = display(s["samples"], s["valid"], show)
        with written(out / f"{stem}_compare.png") as tmp:
            maps.compare(shown, pred, mask, colours).save(tmp)
        print(f"{name}  {image.shape[1]}x{image.shape[0]}  {time.time() - t0:.1f}s")
    s = scores(conf, names)
    print(f"scores on tiles {','.join(map(str, tiles))} of {args.data}:")
    print_scores(s)
    with written(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(s, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description="Map images with a trained model, or score it on dense masks.")
    p.add_argument("inputs", nargs="*", help="images (JPEG, PNG, TIFF, GeoTIFF) or folders of images to map")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. runs/NAME/ckpt.pt")
    p.add_argument("--data", default=None, help="a data set in the Kaggle layout whose --tiles are scored")
    p.add_argument("--tiles", default="", help="comma list of the tiles of --data to score (default: last)")
    p.add_argument("--out", default="predictions",
                   help="folder for masks, overlays, areas.csv, scores and pictures (default: %(default)s)")
    p.add_argument("--suggest", type=int, default=0,
                   help=f"also write the N places per image where the model is least sure, at least "
                   f"{SPACING} pixels apart, to suggestions.csv (and .geojson): where to click next")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda, else mps, when present), 'cpu', 'cuda', ... (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="'auto' times both on this machine and takes the faster (default: %(default)s)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the 8 flips and quarter turns (8 times slower)")
    p.add_argument("--bands", default="", help="the bands of these images to give the model, counted from 1, "
                   "as many as it was trained on (default: the bands it was trained on)")
    p.add_argument("--show-bands", default="", help="the bands shown as red,green,blue in the overlays, e.g. "
                   "4,3,2 for false colour (default: the checkpoint's, else 1,2,3)")
    p.add_argument("--overwrite", action="store_true", help="write over the maps already in --out (a "
                   "suggestions file with classes filled in is never written over)")
    p.add_argument("--polygons", nargs="?", const="gpkg", choices=["gpkg", "geojson"], help="also write the "
                   "maps as polygons, one per region of a class, with its class, image, area_m2, area_ha: "
                   "map.gpkg, one layer 'map' (one per coordinate system, map_EPSG, where scenes differ), or "
                   "'--polygons geojson': map.geojson in longitude and latitude; map.qml beside it")
    p.add_argument("--min-area", type=float, default=0, metavar="M2", help="a minimum mapping unit: regions "
                   "smaller than this many m2 merge into their surroundings, in the masks, areas.csv and the "
                   "polygons alike (default: 0, none)")
    p.add_argument("--aoi", metavar="FILE", help="an area of interest, a layer of polygons (GeoJSON, "
                   "GeoPackage, shapefile, KML, FlatGeobuf): pixels outside it are no data, neither mapped "
                   "nor counted")
    p.add_argument("--margin", action="store_true", help="also write each image's margin (the best class's "
                   "probability less the second's; low: unsure) as a float32 GeoTIFF NAME_margin.tif")
    args = p.parse_args(argv)

    if not args.inputs and not args.data:
        p.error("give images or folders to map, or --data (and --tiles) to score")
    if args.suggest < 0:
        raise DataError(f"--suggest {args.suggest}: must be 0 (none) or more")
    if not 0 <= args.min_area < math.inf:
        raise DataError(f"--min-area {args.min_area}: must be 0 (none) or more square metres")
    wanted = {"--polygons": args.polygons, "--min-area": args.min_area, "--margin": args.margin}
    for flag in [f for f, on in wanted.items() if on]:  # without the GIS extra: one line, before the model
        rasters.need_gdal(flag)
    if args.polygons:
        layers.ogr("--polygons")
    aoi = layers.read_aoi(args.aoi) if args.aoi else None
    bands = band_list(args.bands, "--bands") if args.bands else None
    show = band_list(args.show_bands, "--show-bands", counts=(1, 3)) if args.show_bands else None
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.ckpt, device)
    out = Path(args.out)
    maps.check_out(out, args.overwrite, args.suggest > 0)  # after the quick checks, before the long work
    model = fold_upsampling(fold_batch_norm(model))  # the same maps, fewer operations (support/speed.py)
    dtype = pick_dtype(args.precision, device, model, train=False)
    logits_of = partial(sliding_window, model, dtype=dtype, tta=args.tta)  # (samples, norm=) -> logits
    show = show or meta.get("show_bands")
    legend = zip(meta["classes"], meta["colours"])
    print("legend: " + ", ".join(f"{n} #{r:02X}{g:02X}{b:02X}" for n, (r, g, b) in legend))
    out.mkdir(parents=True, exist_ok=True)
    layout.write_classes(out / "classes.json", meta["classes"], meta["colours"])  # label.py finds them there
    if args.data:
        score_tiles(logits_of, meta, args, out, bands, show)

    files = image_files(args.inputs)
    stems, note = maps.output_stems(files)
    if note:
        print(note)
    failed, areas, suggested, geos, mapped = [], [], [], {}, []
    for path, stem in zip(files, stems):
        t0 = time.time()
        try:
            cells = least_sure if args.suggest else None  # where to look for the places to suggest
            m = maps.map_scene(logits_of, meta, path, out / stem, bands, show, cells, aoi, args.min_area,
                               args.margin)
        except WriteError:  # a full disk: the other maps cannot be written either
            raise
        except (DataError, MemoryError) as e:  # one line for this input; the others are still mapped
            print(f"skipped: {e if isinstance(e, DataError) else f'{path}: not enough memory to map it'}")
            failed.append(path)
            continue
        areas += [(text_cell(path), text_cell(name), *row, text_cell(m["written"][0].name))  # and its mask
                  for name, *row in m["areas"]]
        mapped.append((path.as_posix(), m["written"][0], m["geo"]))
        if args.suggest:
            name = path.as_posix()
            geos[name] = m["geo"]
            margins, xs, ys, classes = (a.tolist() for a in m["candidates"])
            at = {(x, y): (c, g) for g, x, y, c in zip(margins, xs, ys, classes)}  # class and margin there
            suggested += [(name, *xy, *at[xy]) for xy in suggest_clicks(m["candidates"][:3], args.suggest)]
        (w, h), dt = m["size"], time.time() - t0
        outputs = ", ".join(map(str, m["written"]))
        empty = f" (no data: {m['no_data']} pixels)" if m["no_data"] else ""
        print(f"{path}  {w}x{h}{empty}  {dt:.1f}s  {w * h / 1e6 / dt:.2f} MP/s  -> {outputs}")
    if areas:
        with written(out / "areas.csv") as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([("image", "class", "pixels", "share", "hectares", "mask"), *areas])
    if args.polygons and mapped:
        t0 = time.time()
        paths, n = polygons.write_polygons(out, mapped, args.polygons, meta["classes"], meta["colours"])
        if paths:
            print(f"{n} polygons -> {', '.join(map(str, paths))}  {time.time() - t0:.1f}s")
    if suggested:
        paths = clicks.write_suggestions(out, suggested, meta["classes"], geos)
        print(f"{len(suggested)} suggested clicks -> {', '.join(map(str, paths))} (fill in 'class')")
    if failed:
        print(f"{len(failed)} of the inputs could not be read: " + ", ".join(map(str, failed)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(command_line(main))
