"""Where a data set's images, masks and classes are, and which of them a run trains and validates on.

    ROOT/classes.json            class names and #RRGGBB colours in class order (optional with clicks)
    ROOT/Tile N/images/NAME.jpg  the Kaggle tile layout; or any folder of images, at any depth
    ROOT/Tile N/masks/NAME.png   a dense mask, one colour per class: optional (X/images -> X/masks)
"""
import colorsys
import json
import re
from pathlib import Path

import numpy as np

from support import IGNORE, clicks, layers, rasters, shapes
from support.bands import fill_no_data, input_norm, no_data_value
from support.cli import DataError, tile_list, written

# images by their names: Pillow's and GDAL's common formats, JPEG 2000 (Sentinel-2 bands), GDAL's virtual
# mosaics, ENVI and Erdas files; a Sentinel-2 product's .SAFE folder is one scene
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".jp2", ".vrt", ".img")
# colours of classes named without any (no classes.json): land cover's usual colour where a word of the
# name begins with one of these words (as most land-cover maps draw them: water blue, vegetation green,
# roads grey, buildings red), else matplotlib's ten in turn, then hues apart; never one colour twice
CONVENTION = [("water sea lake river ocean pond", "#1F77B4"),
              ("road street asphalt pavement parking", "#7F7F7F"),
              ("building roof house", "#D62728"), ("tree forest wood", "#1B5E20"),
              ("vegetation grass green park shrub meadow", "#2CA02C"), ("crop agricultur farm", "#F2D22E"),
              ("bare soil sand land ground dirt desert", "#D2B48C"), ("snow ice cloud", "#F0F0F0"),
              ("unlabel background", "#000000")]
PALETTE = ["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F",
           "#BCBD22", "#17BECF"]


def hex_to_rgb(h):
    """'#E2A929' -> (226, 169, 41)"""
    return tuple(int(h[i : i + 2], 16) for i in (1, 3, 5))


def default_colours(names):
    """Class names -> their (r, g, b) colours: CONVENTION's where a name matches one of its words, else
    PALETTE's; the usual colours first, so that a name that has one keeps it, whatever comes before."""
    hues = ["#%02X%02X%02X" % tuple(round(v * 255) for v in colorsys.hsv_to_rgb(i * 0.618 % 1, 0.7, 0.9))
            for i in range(len(names))]
    chosen = []
    for name in names:
        words = re.findall(r"[a-z]+", name.lower())
        usual = [h for keys, h in CONVENTION if any(w.startswith(k) for w in words for k in keys.split())]
        chosen.append(next((h for h in usual if h not in chosen), None))
    free = (h for h in PALETTE + hues if h not in chosen)
    return [hex_to_rgb(h or next(free)) for h in chosen]


def read_classes(root, required=True):
    """ROOT/classes.json (or a .json file named) -> (names, colours), colours as (r, g, b) tuples in
    class order; None when there is none and it is not required."""
    path = Path(root) if str(root).endswith(".json") else Path(root) / "classes.json"
    if not path.exists() and not required:
        return None
    try:
        classes = json.loads(path.read_text())["classes"]
        names = [c["title"] for c in classes]
        hexes = [c["color"] for c in classes]
    except FileNotFoundError:
        raise DataError(f"{path}: not found (dense masks need one to name their colours, see README)")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a list of classes with 'title' and 'color' ({type(e).__name__}: {e})")
    for h in hexes:
        if not isinstance(h, str) or not re.fullmatch(r"#[0-9A-Fa-f]{6}", h):
            raise DataError(f"{path}: colour {h!r} is not of the form #RRGGBB")
    if not names:
        raise DataError(f"{path}: holds no classes")
    return names, [hex_to_rgb(h) for h in hexes]


def write_classes(path, names, colours):
    classes = [{"title": n, "color": "#%02X%02X%02X" % tuple(c)} for n, c in zip(names, colours)]
    with written(path) as tmp:
        tmp.write_text(json.dumps({"classes": classes}, indent=1))


def find_images(root):
    """-> [(name relative to root, path, tile number or None)]: the images of ROOT/Tile N/images in the
    Kaggle layout, else every image under ROOT at any depth, outside folders named masks."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    tiles = list_tiles(root)
    found = [(p, t) for t, paths in tiles.items() for p in paths]
    if not tiles:
        found = [(p, None) for p in sorted(root.rglob("*")) if is_image(p)
                 and not {"masks"} & set(p.relative_to(root).parts[:-1])]
    if not found:
        raise DataError(f"{root}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(p.relative_to(root).as_posix(), p, t) for p, t in found]


def list_tiles(root):
    """-> {tile number: [image paths]} for every ROOT/Tile N/images folder ({} if there is none)."""
    tiles = {}
    for d in Path(root).glob("Tile */images"):
        number = d.parent.name.split()[-1]
        images = sorted(p for p in d.iterdir() if is_image(p))
        if number.isdigit() and images:
            tiles[int(number)] = images
    return dict(sorted(tiles.items()))


def is_image(path):
    """Whether a path found in a folder is an image: by its name, but not macOS's copies of a file's
    attributes (._NAME, __MACOSX/) nor the files inside a Sentinel-2 product, which is one image."""
    parts = Path(path).parts
    inside_product = any(p.upper().endswith(".SAFE") for p in parts[:-1])
    if path.name.startswith("._") or "__MACOSX" in parts or inside_product:
        return False
    if path.suffix.upper() == ".SAFE":
        return path.is_dir()
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def mask_path(image_path):
    """X/images/NAME.jpg -> X/masks/NAME.png"""
    return image_path.parent.parent / "masks" / (image_path.stem + ".png")


def read_image(path, bands=None, aoi=None):
    """-> ((H, W, bands) samples as stored, only `bands` (counted from 1) when given; (H, W) bool of the
    pixels with data, inside the area of interest `aoi` where one is given, or None). What was found in
    the file is said in one line."""
    s = rasters.read_scene(path)
    (h, w), n = s["samples"].shape[:2], s["samples"].shape[2]
    if bands and max(bands) > n:
        raise DataError(f"{path}: has {n} band(s), --bands asks for band {max(bands)}")
    if s["note"]:
        print(f"{path}: {s['note']}")
    valid = s["valid"]
    if aoi is not None:  # outside the area of interest: no data
        inside = layers.inside(layers.laid_on(aoi, s["geo"], path), s["geo"], (0, h), (0, w))
        valid = inside if valid is None else valid & inside
    return (s["samples"][..., [b - 1 for b in bands]] if bands else s["samples"]), valid


def read_mask(path, colours, shape):
    """A dense mask -> ((H, W) uint8 class indices, IGNORE where no class; the number of such pixels).
    One colour per class of classes.json; or, one grey band whose values are all class indices (or 255,
    no label), as LandCover.ai, LoveDA and mmsegmentation store them, unless they are all grey colours of
    classes.json. A mask whose pixels mostly match no class (after its one background colour) is named."""
    s = rasters.read_scene(path)
    samples, n = s["samples"], len(colours)
    if samples.shape[:2] != shape:
        raise DataError(f"{path}: mask is {samples.shape[1]}x{samples.shape[0]}, its image is "
                        f"{shape[1]}x{shape[0]}")
    if samples.shape[2] == 1 and samples.dtype.kind == "u":
        present = np.flatnonzero(np.bincount(samples.ravel()))
        greys = {r for r, g, b in colours if r == g == b}
        if not set(present.tolist()) <= greys and ((present < n) | (present == IGNORE)).all():
            mask = samples[..., 0].astype(np.uint8)
            if s["valid"] is not None:
                mask[~s["valid"]] = IGNORE
            return mask, int((mask == IGNORE).sum())
    rgb = np.broadcast_to(samples, shape + (3,)) if samples.shape[2] == 1 else samples[..., :3]
    code = rgb[..., 0].astype(np.int32) << 16  # one int per colour, made a band at a time: less memory
    code |= rgb[..., 1].astype(np.int32) << 8
    code |= rgb[..., 2]
    mask = np.full(code.shape, IGNORE, np.uint8)
    for i, (r, g, b) in enumerate(colours):
        mask[code == (r << 16 | g << 8 | b)] = i
    if s["valid"] is not None:
        mask[~s["valid"]] = IGNORE
    unknown = mask == IGNORE
    if unknown.any():  # a background of one colour (black, say) is fine; many colours in no class are not
        _, counts = np.unique(code[unknown], return_counts=True)
        share = 1 - (unknown.sum() - counts.max()) / mask.size
        if share < 0.9:
            print(f"warning: {path}: only {share:.0%} of the mask's pixels have a colour of classes.json or "
                  "its background colour: a mask saved as JPEG, or drawn with another palette?")
    return mask, int(unknown.sum())


def read_images(files, colours=None, bands=None, aoi=None):
    """[(name, path)] -> (images (H, W, bands) as stored, valids ((H, W) bool or None), masks (H, W) uint8
    with IGNORE where no class or no data, or None each when `colours` is None). Masks are required
    when asked for, and every image must have the same number of bands. Outside `aoi` is no data."""
    images, valids, masks, unknown = [], [], [], 0  # unknown: mask pixels whose colour is in no class
    for _, path in files:
        image, valid = read_image(path, bands, aoi)
        if images and image.shape[2] != images[0].shape[2]:
            raise DataError(f"{path}: has {image.shape[2]} band(s), {files[0][1]} {images[0].shape[2]}: "
                            "choose the same bands of each with --bands")
        mask = None
        if colours is not None:
            if not mask_path(path).exists():
                raise DataError(f"{path}: has no mask (expected {mask_path(path)})")
            mask, n = read_mask(mask_path(path), colours, image.shape[:2])
            unknown += n
            if valid is not None:
                mask[~valid] = IGNORE
        images.append(image)
        valids.append(valid)
        masks.append(mask)
    if unknown:
        print(f"{unknown} mask pixels have a colour in no class and are ignored")
    return images, valids, masks


def tile_files(root, tiles):
    """The images of the given tiles -> [(name, path)]."""
    available = list_tiles(root)
    for t in tiles:
        if t not in available:
            raise DataError(f"{root}: has no Tile {t} (tiles there: {', '.join(map(str, available))})")
    return [(p.relative_to(root).as_posix(), p) for t in tiles for p in available[t]]


# ---------------------------------------------------------------------------- what a run uses


def choose_split(args, root, files, labelled):
    """-> (training files, validation files), each [(name, path)]. Tiles: the images of --train-tiles
    and --val-tiles (all but the last, the last). A folder without tiles: --val-images of the
    `labelled` images, chosen by the seed, are held out whole; the others are trained on."""
    tiles = sorted({t for _, _, t in files if t is not None})
    if tiles:
        if args.val_images is not None:
            raise DataError(f"--val-images: {root} is in the tile layout, whose split --val-tiles sets")
        train_tiles = tile_list(args.train_tiles, tiles[:-1])
        val_tiles = tile_list(args.val_tiles, tiles[-1:])
        for t in train_tiles + val_tiles:
            if t not in tiles:
                raise DataError(f"{root}: has no Tile {t} (tiles there: {', '.join(map(str, tiles))})")
        both = sorted(set(train_tiles) & set(val_tiles))
        if both:
            print(f"warning: validation tile(s) {','.join(map(str, both))} are also trained on: their scores "
                  "are optimistic (the model has seen their labels and their pixels)")
        train = [(n, p) for n, p, t in files if t in train_tiles]
        return train, [(n, p) for n, p, t in files if t in val_tiles]
    if args.train_tiles or args.val_tiles:
        raise DataError(f"--train-tiles, --val-tiles: {root} has no 'Tile N/images' folders (see "
                        "--val-images)")
    candidates = [(n, p) for n, p, _ in files if n in labelled]
    if not candidates:
        raise DataError(f"{root}: no image has a mask (X/images/NAME -> X/masks/NAME.png); clicks without "
                        "masks are given with --point-labels")
    k = args.val_images
    if k is None:  # a fifth, and at least one where there are two or more
        k = len(candidates) // 5 or min(1, len(candidates) - 1)
    if not 0 <= k < len(candidates):
        raise DataError(f"--val-images {k}: {len(candidates)} image(s) have labels, and one at least must be "
                        "trained on")
    held = set(np.random.default_rng(args.seed).permutation(len(candidates))[:k].tolist())
    if held:
        held_names = ", ".join(candidates[i][0] for i in sorted(held))
        print(f"held out for validation (--val-images {k}): {held_names}")
    return ([f for i, f in enumerate(candidates) if i not in held],
            [f for i, f in enumerate(candidates) if i in held])


def check_patch(patch, images):
    """A patch larger than every training image would train on padding: refused. Images smaller
    than a patch are padded, and a line says how many."""
    largest = max((im.shape[:2] for im in images), key=max)
    if patch > max(largest):
        raise DataError(f"--patch {patch}: larger than every training image (the largest is "
                        f"{largest[1]}x{largest[0]}); at most {max(largest) // 32 * 32} here")
    small = sum(min(im.shape[:2]) < patch for im in images)
    if small:
        print(f"--patch {patch}: {small} of {len(images)} training images are smaller and are padded with "
              "mirrored pixels (no labels there)")


def run_data(args, root):
    """Everything a run reads -> dict: classes, colours; names, images (no data filled in), valid, masks
    (dense, or None when training from clicks), points (the clicks, or None); bands (counted from 1)
    and norm, how the network is fed (bands.input_norm); val: [(name, image, valid, truth, dense)] with
    the dense mask or the held-out clicks as truth. With --aoi, pixels outside the area are no data: no
    label, no statistics, no score."""
    aoi = layers.read_aoi(args.aoi) if args.aoi else None
    files = find_images(root)
    if not args.point_labels and not any(mask_path(p).exists() for _, p, _ in files):
        raise DataError(f"{root}: no labels to train on: give your clicks with --point-labels FILE (label.py "
                        "makes one), or dense masks X/masks/NAME.png with a classes.json (see README)")
    classes = read_classes(root, required=not args.point_labels)
    # a mask's colours mean something only through classes.json
    has_mask = {n for n, p, _ in files if mask_path(p).exists()} if classes else set()
    by_image = {}
    if args.point_labels:
        # else the classes.json label.py keeps beside the clicks: the page's keys, order and colours
        classes = classes or read_classes(Path(args.point_labels[0]).parent, required=False)
        info = {n: rasters.image_info(p) for n, p, _ in files}
        known = classes and classes[0]
        by_image, names = clicks.read_clicks(args.point_labels, info, known, args.class_field,
                                             args.points_crs, args.line_width)
        by_image = shapes.one_class_per_pixel(by_image)
        classes = classes or (names, default_colours(names))
    train, val = choose_split(args, root, files, set(by_image) | has_mask if args.point_labels else has_mask)
    if args.point_labels:  # training images without a click teach nothing
        unclicked = [n for n, _ in train if n not in by_image]
        if unclicked:
            print(f"{len(unclicked)} training image(s) have no clicks and are left out")
        train = [(n, p) for n, p in train if n in by_image]
    if not train:
        raise DataError(f"{root}: no training image has clicks")
    names, colours = classes
    out = {"classes": names, "colours": colours, "names": [n for n, _ in train], "points": None, "val": []}
    out["images"], out["valid"], out["masks"] = read_images(train, None if args.point_labels else colours,
                                                            args.bands, aoi)
    n = out["images"][0].shape[2]
    out["bands"] = args.bands or list(range(1, n + 1))
    out["norm"] = input_norm(out["images"], out["valid"])  # before no data is filled in
    fill = no_data_value(out["norm"])
    kind = np.result_type(*out["images"])  # one type for a batch (uint8 with uint16 tiles, say)
    out["images"] = [fill_no_data(im.astype(kind, copy=False), v, fill)
                     for im, v in zip(out["images"], out["valid"])]
    if args.point_labels:
        out["points"] = [(i, x, y, c) for i, (n, _) in enumerate(train) for x, y, c in by_image[n]]
        if aoi is not None:
            out["points"] = outside_aoi(out["points"], out["valid"], "training")
    val_dense = [(n, p) for n, p in val if n in has_mask]
    val_clicked = [(n, p) for n, p in val if n not in has_mask and n in by_image]
    for part, part_colours in [(val_dense, colours), (val_clicked, None)]:
        images, valids, masks = read_images(part, part_colours, args.bands, aoi)
        for (name, path), image, valid, mask in zip(part, images, valids, masks):
            if image.shape[2] != n:
                raise DataError(f"{path}: has {image.shape[2]} band(s), the training images {n}")
            dense = mask is not None
            if not dense:  # the held-out clicks, as a label map: IGNORE but at the clicks
                mask = np.full(image.shape[:2], IGNORE, np.uint8)
                xs, ys, labels = np.array(by_image[name]).T
                mask[ys, xs] = labels
                if valid is not None and aoi is not None:
                    mask[~valid] = IGNORE
            out["val"].append((name, fill_no_data(image, valid, fill), valid, mask, dense))
    if not out["val"]:
        print("no validation: no validation image has a mask or clicks (see --val-images, --val-tiles)")
    return out


def outside_aoi(points, valids, what):
    """[(image index, x, y, class)] -> those on pixels with data (inside --aoi); the others in one line."""
    kept = [p for p in points if valids[p[0]] is None or valids[p[0]][p[2], p[1]]]
    if len(kept) < len(points):
        print(f"--aoi: {len(points) - len(kept)} of the {len(points)} {what} labels lie outside it (or on no "
              "data) and are left out")
    return kept
