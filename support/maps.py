"""Maps of real scenes written to disk: the class mask (a GeoTIFF with the scene's tags, or a PNG and
its world file), an overlay, the area of each class; scenes of any size mapped block by block; and the
side-by-side pictures of the maps.
"""
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, TiffImagePlugin

from support import IGNORE, clicks, scene
from support.bands import display, model_input
from support.cli import DataError, check_writable, written

BLOCK = 4096  # largest side of the blocks a scene is mapped in: a 4096 x 4096 block's logits take 400 MB
HALO = 64  # pixels of context around a block, mapped with it and then cut off

# what predict.py writes in --out: a folder that holds any of these is not written over by chance
OUTPUTS = ["areas.csv", "metrics.json", "suggestions.csv", "suggestions.geojson", "*_mask.png", "*_mask.tif",
           "*_overlay.jpg", "*_compare.png"]
ASSESSMENT = ["sample.csv", "sample.geojson", "strata.json", "accuracy.json"]  # assess.py's, of those maps


def blocks(size, block):
    """-> [(start, end)]: as few pieces of at most `block` pixels as cover [0, size), of about one length,
    each starting at a multiple of 32 (the cells where suggested clicks are looked for line up)."""
    n = math.ceil(size / block)
    side = math.ceil(size / n / 32) * 32
    return [(start, min(start + side, size)) for start in range(0, size, side)]


def logits_in_blocks(logits_of, image, block, halo=HALO):
    """Yield ((rows, columns) of the image, (C, rows, columns) logits) block by block. logits_of(samples)
    maps an (h, w, bands) piece of the image (predict.sliding_window); each block is given `halo` more
    pixels on every side where the image has them, for context, and its logits are cut back to the block.
    An image of one block is mapped whole, as predict.sliding_window maps it; memory grows with the
    block, not with the image."""
    h, w = image.shape[:2]
    for y0, y1 in blocks(h, block):
        for x0, x1 in blocks(w, block):
            top, left = max(y0 - halo, 0), max(x0 - halo, 0)
            logits = logits_of(image[top : min(y1 + halo, h), left : min(x1 + halo, w)])
            yield (slice(y0, y1), slice(x0, x1)), logits[:, y0 - top : y1 - top, x0 - left : x1 - left]


def map_in_blocks(logits_of, image, margin=False, progress=False):
    """(H, W, bands) image -> ((H, W) uint8 class map, (H, W) float16 margin between the probabilities of
    the two best classes, or None). With `progress`, a line after each block of a scene of several."""
    h, w = image.shape[:2]
    pred, done, t0 = np.empty((h, w), np.uint8), 0, time.time()
    gap = np.empty((h, w), np.float16) if margin else None
    for (rows, cols), logits in logits_in_blocks(logits_of, image, BLOCK):
        pred[rows, cols] = logits.max(0).indices.to(torch.uint8).cpu().numpy()  # the argmax, faster on a CPU
        if margin:
            top2 = logits.softmax(0).topk(2, dim=0).values
            gap[rows, cols] = (top2[0] - top2[1]).cpu().numpy()
        del logits  # before the next block is mapped
        done += (rows.stop - rows.start) * (cols.stop - cols.start)
        if progress and done < h * w:
            speed = done / 1e6 / (time.time() - t0)
            print(f"  {done / (h * w):.0%} of {h * w / 1e6:.1f} MP  {speed:.2f} MP/s  "
                  f"{(h * w - done) / 1e6 / speed:.0f}s left", flush=True)
    return pred, gap


def map_scene(logits_of, meta, path, stem, bands=None, show=None, margin=False):
    """Map one scene with logits_of(samples, norm=) (predict.sliding_window) and write its mask and overlay
    (`show`: its bands as red, green, blue) -> dict: pred, margin (or None), geo, areas (rows of
    class_areas), written (paths)."""
    s = scene.read_scene(path)
    if s["note"]:
        print(f"{path}: {s['note']}")
    try:
        image, norm = model_input(s, meta, bands)
    except DataError as e:
        raise DataError(f"{path}: {e}")
    pred, gap = map_in_blocks(lambda samples: logits_of(samples, norm=norm), image, margin, progress=True)
    del image  # where bands were picked, a copy: gone before the picture is made
    if s["valid"] is not None:  # no data: no class, black in the mask, left out of the areas
        pred[~s["valid"]] = IGNORE
        if gap is not None:
            gap[~s["valid"]] = np.inf
    geo = s["geo"]
    written = [write_mask(colourize(pred, meta["colours"]), stem, geo)]
    shown = display(s["samples"], s["valid"], show)  # what a person sees of the scene
    written.append(write_overlay(shown, pred, meta["colours"], stem, geo))
    areas = class_areas(pred, meta["classes"], geo["pixel_m2"] if geo else None)
    return {"pred": pred, "margin": gap, "geo": geo, "areas": areas, "written": written}


def check_out(out, overwrite, suggest):
    """Refuse an --out that already holds maps, unless `overwrite`; refuse, whatever `overwrite` says, to
    write suggestions over ones in which a person has filled in a class; then try the folder for writing."""
    held = sorted({p.name for pattern in OUTPUTS for p in out.glob(pattern)}) if out.is_dir() else []
    if held and not overwrite:
        some = ", ".join(held[:3]) + ", ..." * (len(held) > 3)
        raise DataError(f"--out {out}: already holds maps ({some}); --overwrite writes over them, or choose "
                        "another folder")
    sample = [name for name in ASSESSMENT if (out / name).exists()]
    if sample:
        raise DataError(f"--out {out}: holds an accuracy sample of its maps ({', '.join(sample)}), which new "
                        "maps would not match: move it away, or choose another --out")
    for name in ("suggestions.csv", "suggestions.geojson") if suggest else ():
        filled = clicks.filled_in(out / name)
        if filled:
            raise DataError(f"{out / name}: {filled} suggestion(s) have a class filled in, a person's work, "
                            "which is never written over: move the file away or choose another --out")
    check_writable(out, "--out")


def write_mask(mask, stem, geo):
    """The palette mask: a GeoTIFF with the input's tags when it had them, else a PNG, with a world
    file (and the input's .prj) beside it when the input had one -> path written."""
    if geo and geo["tags"]:
        info = TiffImagePlugin.ImageFileDirectory_v2()
        for tag, (kind, value) in geo["tags"].items():
            info[tag], info.tagtype[tag] = value, kind
        path = Path(f"{stem}_mask.tif")
        with written(path) as tmp:
            mask.save(tmp, tiffinfo=info, compression="tiff_deflate")
        return path
    path = Path(f"{stem}_mask.png")
    with written(path) as tmp:
        mask.save(tmp)
    write_world(path, ".pgw", geo)
    return path


def write_world(path, suffix, geo):
    if geo:
        with written(path.with_suffix(suffix)) as tmp:
            tmp.write_text("".join(f"{v!r}\n" for v in geo["world"]))
        if geo["prj"]:
            with written(path.with_suffix(".prj")) as tmp:
                shutil.copyfile(geo["prj"], tmp)


def write_overlay(rgb, pred, colours, stem, geo):
    """The scene with the classes blended on it, half and half, as a JPEG (and world file); made in
    strips, so that no float copy of a large scene is ever held."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colours)] = colours
    overlay = np.empty_like(rgb)
    for y in range(0, len(rgb), 256):
        strip, classes = rgb[y : y + 256], pred[y : y + 256]
        blend = strip // 2 + palette[classes] // 2
        overlay[y : y + 256] = np.where((classes == IGNORE)[..., None], strip, blend)  # no data: as it is
    path = Path(f"{stem}_overlay.jpg")
    with written(path) as tmp:
        Image.fromarray(overlay).save(tmp, quality=90)
    write_world(path, ".jgw", geo)
    return path


def class_areas(pred, names, pixel_m2):
    """-> rows (class, pixels, share of the scene's valid pixels, hectares or ''). pixel_m2: a pixel's
    area, one number, or one per row (degrees), or None when unknown."""
    counts, m2 = np.zeros(len(names), np.int64), np.zeros(len(names))
    for y in range(0, len(pred), 256):  # in strips: bincount works on a 64-bit copy of what it counts
        strip = pred[y : y + 256].astype(np.int64)
        rows = np.arange(len(strip))[:, None] * 256  # (row, class) counted at once; IGNORE counts nowhere
        per_row = np.bincount((rows + strip).ravel(), minlength=256 * len(strip)).reshape(-1, 256)
        per_row = per_row[:, : len(names)]
        counts += per_row.sum(0)
        if pixel_m2 is not None:
            area = np.asarray(pixel_m2, np.float64)[y : y + 256] if np.ndim(pixel_m2) else pixel_m2
            area = np.broadcast_to(area, len(strip))
            m2 += (per_row * area[:, None]).sum(0)
    total = max(int(counts.sum()), 1)
    return [(n, int(c), f"{c / total:.4f}", f"{a / 1e4:.4f}" if pixel_m2 is not None else "")
            for n, c, a in zip(names, counts, m2)]


def output_stems(paths):
    """One output name per input: its file name, or, where inputs share one, its path from their
    common folder (a/scene.jpg and b/scene.jpg -> a_scene, b_scene) -> (stems, note or '')."""
    stems = [p.stem for p in paths]
    shared = {s for s in stems if stems.count(s) > 1}
    if not shared:
        return stems, ""
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    for keep_suffix in (False, True):  # x.jpg and x.png side by side: x_jpg, x_png
        named = [str(p.resolve().relative_to(common)) for p in paths]
        named = [n if keep_suffix else str(Path(n).with_suffix("")) for n in named]
        named = [n.replace(os.sep, "_").replace(".", "_") if s in shared else s for n, s in zip(named, stems)]
        if len(set(named)) == len(named):
            break
    renamed = ", ".join(f"{p} -> {n}" for p, n, s in zip(paths, named, stems) if s in shared)
    return named, f"inputs share a file name; their outputs are named by their paths: {renamed}"


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
    errors[truth == IGNORE] = 0
    size = (round(image.shape[1] * height / image.shape[0]), height)
    pictures = [Image.fromarray(image).resize(size, Image.BILINEAR)]  # the classes: nearest, no blend
    pictures += [p.resize(size, Image.NEAREST) for p in (colourize(pred, colours), colourize(truth, colours),
                                                          Image.fromarray(errors))]
    return side_by_side(pictures)


def draw_points(image, labels, colours):
    """The image with each labelled pixel drawn as a 3x3 dot in its class colour."""
    dots, (h, w) = image.copy(), labels.shape
    ys, xs = np.nonzero(labels != IGNORE)
    colour = np.array(colours, np.uint8)[labels[ys, xs]]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            dots[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = colour
    return Image.fromarray(dots)
