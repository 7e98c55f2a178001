"""Maps of real scenes written to disk a block at a time, so that a scene of any size is mapped in
bounded memory: the class mask (a GeoTIFF with the scene's georeference, its no data and the class
colours and names, or a PNG for a plain picture) and its QGIS style, an overlay for a person to look at,
the area of each class, the model's margin as a raster, and the places where the model is least sure;
and the side-by-side pictures of the maps. Pixels outside an area of interest are no data.
"""
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from support import IGNORE, clicks, geotiffs, layers, polygons, rasters, styles
from support.bands import display, input_plan, model_input
from support.cli import DataError, check_writable, written

BLOCK = 2048  # largest side of the blocks a scene is mapped in (their logits: 110 MB); memory is then
# set by the model's windows (predict.WINDOW), about 2 GB, whatever the scene's size
HALO = 64  # pixels of context around a block, mapped with it and then cut off, as windows overlap
OVERLAY = 16e6  # most pixels of an overlay (4000 x 4000): a larger scene's is made at a coarser step, a
# picture to look at; composing it holds ~20 bytes a pixel

# what predict.py writes in --out: a folder that holds any of these is not written over by chance
OUTPUTS = ["areas.csv", "metrics.json", "suggestions.csv", "suggestions.geojson", "*_mask.png", "*_mask.tif",
           "*_mask.qml", "*_margin.tif", "*_overlay.jpg", "*_overlay.tif", "*_compare.png", "map.gpkg",
           "map.geojson", "map.qml", "classes.json"]
ASSESSMENT = ["sample.csv", "sample.geojson", "strata.json", "accuracy.json"]  # assess.py's, of those maps


def blocks(size, block):
    """-> [(start, end)]: as few pieces of at most `block` pixels as cover [0, size), of about one length,
    each starting at a multiple of 32 (the cells where suggested clicks are looked for line up)."""
    n = math.ceil(size / block)
    side = math.ceil(size / n / 32) * 32
    return [(start, min(start + side, size)) for start in range(0, size, side)]


def logits_in_blocks(logits_of, read, shape, block, halo=HALO):
    """Yield ((rows, columns), logits (C, rows, columns), samples, valid) block by block.
    read((row0, row1), (col0, col1)) -> (samples (h, w, bands), valid (h, w) or None) of a window;
    logits_of(samples, valid) maps it (predict.sliding_window). Each block is mapped with `halo` more
    pixels on every side where the scene has them, for context, then cut back: a scene of one block is
    mapped whole, as predict.sliding_window maps it; memory grows with the block, not with the scene."""
    h, w = shape
    for y0, y1 in blocks(h, block):
        for x0, x1 in blocks(w, block):
            top, left = max(y0 - halo, 0), max(x0 - halo, 0)
            samples, valid = read((top, min(y1 + halo, h)), (left, min(x1 + halo, w)))
            logits = logits_of(samples, valid)
            inside = slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)
            yield ((slice(y0, y1), slice(x0, x1)), logits[:, inside[0], inside[1]], samples[inside],
                   None if valid is None else valid[inside])


def map_in_blocks(logits_of, image, margin=False):
    """An (H, W, bands) image in memory, logits_of(samples) -> ((H, W) uint8 class map, (H, W) float32
    margin between the probabilities of the two best classes, or None)."""
    h, w = image.shape[:2]
    pred, gap = np.empty((h, w), np.uint8), np.empty((h, w), np.float32) if margin else None
    read = lambda rows, cols: (image[rows[0] : rows[1], cols[0] : cols[1]], None)  # noqa: E731
    for (rows, cols), logits, _, _ in logits_in_blocks(lambda s, v: logits_of(s), read, (h, w), BLOCK):
        pred[rows, cols] = classes_of(logits)
        if margin:
            gap[rows, cols] = margin_of(logits)
    return pred, gap


def classes_of(logits):
    return logits.max(0).indices.to(torch.uint8).cpu().numpy()  # the argmax, faster on a CPU


def margin_of(logits):
    """The probability of the best class minus that of the second, per pixel."""
    top2 = logits.softmax(0).topk(2, dim=0).values
    return (top2[0] - top2[1]).cpu().numpy()


def map_scene(logits_of, meta, path, stem, bands=None, show=None, least_sure=None, aoi=None, min_area=0,
              margin=False):
    """Map one scene from disk block by block, writing its mask as it goes, then its overlay (`show`: the
    bands a person sees as red, green, blue). logits_of(samples, norm=) -> logits: predict.sliding_window;
    least_sure(margin) -> (margins, xs, ys) of each cell (predict.least_sure), where suggestions are
    wanted; aoi: the area of interest (layers.read_aoi), outside which pixels are no data; min_area: the
    m2 of the smallest region kept (polygons.sieve, on the whole mask held in memory, 2 bytes a pixel);
    margin: write the margin as a raster too. -> dict: size (w, h), geo, areas (rows of area_rows), no_data
    (pixels), candidates ((margins, xs, ys, classes) or None), written (paths: the mask first)."""
    with rasters.opened(path) as scene:
        h, w, n = scene["shape"]
        if scene["note"]:
            print(f"{path}: {scene['note']}")
        try:
            plan = input_plan(n, scene["dtype"], meta, bands)
        except DataError as e:
            raise DataError(f"{path}: {e}")
        geo, names, colours = scene["geo"], meta["classes"], meta["colours"]
        if geo is None:  # a picture's mask is made whole in memory (a byte a pixel): its header is checked
            rasters.check_size(path, w, h, n, scene["itemsize"], held=1)
        step = max(1, math.ceil(math.sqrt(h * w / OVERLAY)))  # the overlay's: every step-th row and column
        small = {"samples": [], "pred": [], "valid": []}  # the overlay's, block by block
        counts, m2, found, empty = np.zeros(len(names), np.int64), np.zeros(len(names)), [], 0
        shown = show or ([1, 2, 3] if n >= 3 else [1])
        if max(shown) > n:
            raise DataError(f"{path}: --show-bands {','.join(map(str, shown))}: the scene has {n} band(s)")

        def logits(samples, valid):
            if valid is not None and not valid.any():  # all no data (outside the area of interest): no model
                return torch.zeros(len(names), *samples.shape[:2])
            return logits_of(model_input(samples, valid, plan), norm=plan[1])

        read = scene["read"] if aoi is None else layers.clip(scene["read"], aoi, geo, path)
        pixels = min_area and polygons.min_pixels(min_area, geo)
        if min_area and not pixels:
            print(f"{path}: not on the map (no pixel size): --min-area leaves it unsieved")
        held = np.full((h, w), IGNORE, np.uint8) if pixels else None  # the mask to sieve, whole
        with mask_file(stem, (h, w), geo, names, colours) as (write, mask_path), \
                margin_file(stem, (h, w), geo, margin) as (write_margin, margin_path):
            done, t0 = 0, time.time()
            for (rows, cols), block, samples, valid in logits_in_blocks(logits, read, (h, w), BLOCK):
                pred = classes_of(block)
                if valid is not None:  # no data: no class, black in the mask, left out of the areas
                    pred[~valid] = IGNORE
                if held is None:
                    write(rows, cols, pred)
                    c, a = count_classes(pred, len(names), rows_area(geo, rows))
                    counts, m2 = counts + c, m2 + a
                else:
                    held[rows, cols] = pred
                empty += int((pred == IGNORE).sum())
                gap = margin_of(block) if margin or least_sure else None
                if margin:
                    write_margin(rows, cols, np.where(pred == IGNORE, np.nan, gap))
                if least_sure is not None:
                    gap[pred == IGNORE] = np.inf
                    margins, xs, ys = least_sure(gap)
                    inside = (xs < pred.shape[1]) & (ys < pred.shape[0])  # a cell past the edge: no pixel
                    xs, ys = xs[inside], ys[inside]
                    found.append((margins[inside], xs + cols.start, ys + rows.start, pred[ys, xs]))
                keep = slice(-rows.start % step, None, step), slice(-cols.start % step, None, step)
                # copies: a view of every step-th pixel would keep each whole block in memory to the end
                small["samples"].append((rows.start, cols.start, samples[keep][..., [b - 1 for b in shown]]))
                small["pred"].append(pred[keep].copy())
                small["valid"].append(None if valid is None else valid[keep].copy())
                del block  # before the next block is mapped
                done += (rows.stop - rows.start) * (cols.stop - cols.start)
                if done < h * w:
                    speed = done / 1e6 / (time.time() - t0)
                    print(f"  {done / (h * w):.0%} of {h * w / 1e6:.1f} MP  {speed:.2f} MP/s  "
                          f"{(h * w - done) / 1e6 / speed:.0f}s left", flush=True)
            if held is not None:  # --min-area: the small regions merge into their surroundings, then the mask
                write(slice(0, h), slice(0, w), polygons.sieve(held, pixels))  # is written and counted, and
                counts, m2 = count_rows(held, len(names), geo)  # the overlay and suggestions show its classes
                small["pred"] = [held[-y % step + y :: step, -x % step + x :: step][: len(p), : p.shape[1]]
                                 for (y, x, _), p in zip(small["samples"], small["pred"])]
                found = [(g, xs, ys, held[ys, xs]) for g, xs, ys, _ in found]
                del held
        overlay = write_overlay(small, (math.ceil(h / step), math.ceil(w / step)), step, colours, stem, geo)
    candidates = tuple(map(np.concatenate, zip(*found))) if found else None
    known = geo is not None and geo["pixel_m2"] is not None
    return {"size": (w, h), "geo": geo, "areas": area_rows(names, counts, m2, known), "no_data": empty,
            "candidates": candidates, "written": [mask_path, overlay] + [margin_path] * margin}


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


@contextmanager
def mask_file(stem, size, geo, names, colours):
    """with mask_file(...) as (write, path): write(rows, columns, classes) puts a block of the class map
    in its file. A georeferenced scene's mask is a GeoTIFF (through GDAL: tiled, compressed, with
    overviews when large; its georeference, no data 255, the class colours, and the class names as GDAL's
    category names), written block by block; a picture's is a PNG, made whole at the end (a world file
    beside it where the picture had one and GDAL is not installed). Either has its QGIS style beside it."""
    h, w = size
    rasterio = rasters.gdal()
    if geo is None or rasterio is None:
        path, pred = Path(f"{stem}_mask.png"), np.full((h, w), IGNORE, np.uint8)
        yield (lambda rows, cols, block: pred.__setitem__((rows, cols), block)), path
        with written(path) as tmp:
            colourize(pred, colours).save(tmp)
        write_world(path.with_suffix(".pgw"), geo)
        styles.mask_style(path.with_suffix(".qml"), names, colours)
        return
    path = Path(f"{stem}_mask.tif")
    with written(path) as tmp, geotiffs.create(tmp, size, geo, "uint8", nodata=IGNORE) as ds:
        ds.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colours)} | {IGNORE: (0, 0, 0, 0)})
        yield (lambda rows, cols, block: ds.write(block, 1, window=geotiffs.window(rows, cols))), path
        geotiffs.overviews(ds, "nearest")
    with written(Path(f"{path}.aux.xml")) as tmp:
        geotiffs.category_names(tmp, names)
    styles.mask_style(path.with_suffix(".qml"), names, colours)


@contextmanager
def margin_file(stem, size, geo, wanted):
    """with margin_file(...) as (write, path): write(rows, columns, margins) puts a block of the margin (the
    best class's probability less the second's; NaN: no data) in a float32 GeoTIFF beside the mask, or a
    plain TIFF for a picture; (None, None) where it is not `wanted`."""
    if not wanted:
        yield None, None
        return
    path = Path(f"{stem}_margin.tif")
    with written(path) as tmp, geotiffs.create(tmp, size, geo, "float32", nodata=np.nan) as ds:
        yield (lambda rows, cols, block: ds.write(block, 1, window=geotiffs.window(rows, cols))), path
        geotiffs.overviews(ds, "average")


def write_mask(pred, stem, geo, names, colours):
    """A whole (H, W) class map -> its mask file, as map_scene writes it -> path."""
    with mask_file(stem, pred.shape, geo, names, colours) as (write, path):
        write(slice(0, pred.shape[0]), slice(0, pred.shape[1]), pred)
    return path


def class_areas(pred, names, pixel_m2):
    """A whole (H, W) class map -> area_rows; pixel_m2: one number, one per row, or None (unknown)."""
    return area_rows(names, *count_classes(pred, len(names), pixel_m2), pixel_m2 is not None)


def write_world(path, geo):
    """A world file for a picture of a georeferenced scene, where GDAL (which would carry its coordinate
    system too) is not installed."""
    if geo is not None:
        with written(path) as tmp:
            tmp.write_text("".join(f"{v!r}\n" for v in geo["world"]))


def write_overlay(small, size, step, colours, stem, geo):
    """The scene with its classes blended on, half and half, for a person to look at, every step-th pixel
    of it: the scene's picture stretched as a whole (support.bands.display). A georeferenced scene's is
    a GeoTIFF that carries its place and coordinate system (JPEG-compressed), a picture's a JPEG -> path."""
    first = small["samples"][0][2]
    samples = np.zeros((*size, first.shape[2]), first.dtype)
    pred = np.full(size, IGNORE, np.uint8)
    valid = None if all(v is None for v in small["valid"]) else np.ones(size, bool)
    for (y, x, part), p, v in zip(small["samples"], small["pred"], small["valid"]):
        y, x = math.ceil(y / step), math.ceil(x / step)
        samples[y : y + len(part), x : x + part.shape[1]] = part
        pred[y : y + len(p), x : x + p.shape[1]] = p
        if v is not None:
            valid[y : y + len(v), x : x + v.shape[1]] = v
    picture = display(samples, valid, [1, 2, 3] if samples.shape[2] == 3 else [1])
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colours)] = colours
    blend = picture // 2 + palette[pred] // 2
    blend = np.where((pred == IGNORE)[..., None], picture, blend)  # no data: the scene as it is
    if geo is None or rasters.gdal() is None:
        path = Path(f"{stem}_overlay.jpg")
        with written(path) as tmp:
            Image.fromarray(blend).save(tmp, quality=90)
        write_world(path.with_suffix(".jgw"), geo and geotiffs.coarser(geo, step))
        return path
    path = Path(f"{stem}_overlay.tif")
    with written(path) as tmp, geotiffs.create(tmp, size, geotiffs.coarser(geo, step), "uint8", bands=3,
                                               compress="jpeg", photometric="ycbcr") as ds:
        ds.write(np.moveaxis(blend, -1, 0))
        geotiffs.overviews(ds, "average")
    return path


def rows_area(geo, rows):
    """The area of one pixel of each row of `rows` in m2 (one number where all are alike), or None."""
    area = None if geo is None else geo["pixel_m2"]
    return area[rows] if isinstance(area, list) else area


def count_rows(pred, n, geo, strip=1024):
    """A whole (H, W) class map -> count_classes' (pixels, m2) of its classes, counted a strip of rows at a
    time (np.bincount makes an 8-byte copy of what it counts)."""
    counts, m2 = np.zeros(n, np.int64), np.zeros(n)
    for y in range(0, len(pred), strip):
        c, a = count_classes(pred[y : y + strip], n, rows_area(geo, slice(y, y + strip)))
        counts, m2 = counts + c, m2 + a
    return counts, m2


def count_classes(pred, n, pixel_m2):
    """A block of the class map -> (pixels of each of n classes, their m2: 0 where the area is unknown);
    IGNORE counts nowhere. pixel_m2: one number, one per row, or None."""
    m2 = np.zeros(n)
    if isinstance(pixel_m2, list):  # degrees: rows nearer the poles hold smaller pixels
        per_row = np.stack([np.bincount(r, minlength=256)[:n] for r in pred])
        return per_row.sum(0), (per_row * np.asarray(pixel_m2)[:, None]).sum(0)
    counts = np.bincount(pred.ravel(), minlength=256)[:n]
    return counts, m2 if pixel_m2 is None else counts * pixel_m2


def area_rows(names, counts, m2, known):
    """-> rows (class, pixels, share of the scene's valid pixels, hectares or '' where the area is
    unknown)."""
    total = max(int(counts.sum()), 1)
    return [(n, int(c), f"{c / total:.4f}", f"{a / 1e4:.4f}" if known else "")
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
