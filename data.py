"""Reading data: images and colour masks in the Kaggle layout, 256x256 patches, point labels.

    ROOT/classes.json               class names and #RRGGBB colours, in class-index order
    ROOT/Tile N/images/NAME.jpg     an aerial image
    ROOT/Tile N/masks/NAME.png      its dense mask, one colour per class (RGB or palette PNG)
"""
import csv
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import DataError

IGNORE = 255  # label of pixels that carry no class: unlabelled, no-data, padding
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


# ---------------------------------------------------------------------------- reading files


def read_classes(root):
    """ROOT/classes.json -> (names, colours), colours as (r, g, b) tuples in class order."""
    path = Path(root) / "classes.json"
    try:
        classes = json.loads(path.read_text())["classes"]
        names = [c["title"] for c in classes]
        hexes = [c["color"] for c in classes]
    except FileNotFoundError:
        raise DataError(f"{path}: not found (every data set needs one, see README)")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a list of classes with 'title' and 'color' ({type(e).__name__}: {e})")
    for h in hexes:
        if not isinstance(h, str) or not re.fullmatch(r"#[0-9A-Fa-f]{6}", h):
            raise DataError(f"{path}: colour {h!r} is not of the form #RRGGBB")
    if not names:
        raise DataError(f"{path}: holds no classes")
    return names, [hex_to_rgb(h) for h in hexes]


def hex_to_rgb(h):
    """'#E2A929' -> (226, 169, 41)"""
    return tuple(int(h[i : i + 2], 16) for i in (1, 3, 5))


def list_tiles(root):
    """-> {tile number: [image paths]} for every ROOT/Tile N/images folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    tiles = {}
    for d in root.glob("Tile */images"):
        number = d.parent.name.split()[-1]
        images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if number.isdigit() and images:
            tiles[int(number)] = images
    if not tiles:
        raise DataError(f"{root}: holds no 'Tile N/images' folders with images")
    return dict(sorted(tiles.items()))


def read_image(path):
    """Any image Pillow reads -> (H, W, 3) uint8."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as e:  # truncated, no image, or past Pillow's size guard
        raise DataError(f"{path}: cannot read image ({e})")


def read_mask(path, colours):
    """A colour mask -> ((H, W) uint8 class indices, IGNORE where the colour is in no class,
    number of such pixels)."""
    rgb = read_image(path).astype(np.int32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # one int per colour
    mask = np.full(code.shape, IGNORE, np.uint8)
    for i, (r, g, b) in enumerate(colours):
        mask[code == (r << 16 | g << 8 | b)] = i
    return mask, int((mask == IGNORE).sum())


def mask_path(image_path):
    """Tile N/images/NAME.jpg -> Tile N/masks/NAME.png"""
    return image_path.parent.parent / "masks" / (image_path.stem + ".png")


def load_tiles(root, tiles, colours):
    """Read the images and dense masks of the given tiles.
    -> (names relative to root, images (H, W, 3) uint8, masks (H, W) uint8)."""
    available = list_tiles(root)
    names, images, masks, unknown = [], [], [], 0  # unknown: pixels whose colour is in no class
    for t in tiles:
        if t not in available:
            raise DataError(f"{root}: has no Tile {t} (tiles there: {', '.join(map(str, available))})")
        for path in available[t]:
            m_path = mask_path(path)
            if not m_path.exists():
                raise DataError(f"{path}: has no mask (expected {m_path})")
            image = read_image(path)
            mask, n = read_mask(m_path, colours)
            if mask.shape != image.shape[:2]:
                h, w = image.shape[:2]
                mh, mw = mask.shape
                raise DataError(f"{m_path}: mask is {mw}x{mh}, its image {path.name} is {w}x{h}")
            names.append(path.relative_to(root).as_posix())
            images.append(image)
            masks.append(mask)
            unknown += n
    if unknown:
        print(f"tiles {','.join(map(str, tiles))}: {unknown} mask pixels have a colour in no class and are "
              "ignored")
    return names, images, masks


# ---------------------------------------------------------------------------- patches and points


def grid(size, patch):
    """Start offsets of patches covering [0, size): a regular grid, the last one flush with the end."""
    if size <= patch:
        return [0]
    return list(range(0, size - patch, patch)) + [size - patch]


def pad_to(image, mask, patch):
    """Pad an image smaller than a patch (mirrored pixels) and its mask (IGNORE) up to the patch size."""
    h, w = mask.shape
    ph, pw = max(patch - h, 0), max(patch - w, 0)
    if ph == pw == 0:
        return image, mask
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return image, np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)


def sample_points(masks, patch, n, seed):
    """n points per grid patch, drawn once, without replacement, only on pixels with a class.

    Overlapping patches never draw the same pixel twice. -> (list of (image index, x, y, class),
    number of patches that had fewer than n labelled pixels and gave all they had).
    """
    rng = np.random.default_rng(seed)
    points, short = [], 0
    for i, mask in enumerate(masks):
        taken = np.zeros(mask.shape, bool)
        for y0 in grid(mask.shape[0], patch):
            for x0 in grid(mask.shape[1], patch):
                window = (slice(y0, y0 + patch), slice(x0, x0 + patch))
                ys, xs = np.nonzero((mask[window] != IGNORE) & ~taken[window])
                k = min(n, len(ys))
                short += k < n
                for j in rng.choice(len(ys), size=k, replace=False):
                    y, x = y0 + ys[j], x0 + xs[j]
                    taken[y, x] = True
                    points.append((i, int(x), int(y), int(mask[y, x])))
    return points, short


def write_points(path, points, names):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class"])
        w.writerows([names[i], x, y, c] for i, x, y, c in points)


def read_points(path, root, names, masks, num_classes):
    """A points CSV (image,x,y,class) -> list of (image index, x, y, class); rows of images
    of other tiles are skipped, anything else that does not fit is an error."""
    index = {name: i for i, name in enumerate(names)}
    elsewhere = {p.relative_to(root).as_posix() for images in list_tiles(root).values() for p in images}
    points = []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    for line, row in enumerate(rows, start=2):
        try:
            image, x, y, c = row["image"], int(row["x"]), int(row["y"]), int(row["class"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{line}: expected columns image,x,y,class with integer x, y, class")
        if image not in index:
            if image in elsewhere:
                continue  # an image of a tile this run does not train on
            raise DataError(f"{path}:{line}: unknown image {image!r}")
        h, w = masks[index[image]].shape
        if not (0 <= x < w and 0 <= y < h):
            raise DataError(f"{path}:{line}: point ({x}, {y}) is outside {image} ({w}x{h})")
        if not 0 <= c < num_classes:
            raise DataError(f"{path}:{line}: unknown class {c} (classes are 0..{num_classes - 1})")
        points.append((index[image], x, y, c))
    if not points:
        raise DataError(f"{path}: holds no point of the training images")
    return points


def point_masks(points, masks):
    """Sparse label maps: IGNORE everywhere but at the points."""
    sparse = [np.full_like(m, IGNORE) for m in masks]
    for i, x, y, c in points:
        sparse[i][y, x] = c
    return sparse


class PatchDataset(torch.utils.data.Dataset):
    """Grid patches of in-memory images -> (image (P, P, 3) uint8, labels (P, P) uint8, index).

    Augmentation (a random flip and 90-degree rotation, the same for image and labels) is a
    pure function of (seed, epoch, index), so any number of workers, processes or a resumed
    run see exactly the same batches.
    """

    def __init__(self, images, labels, patch, augment=True, seed=0):
        self.images, self.labels, self.patch = [], [], patch
        for im, lab in zip(images, labels):
            im, lab = pad_to(im, lab, patch)
            self.images.append(im)
            self.labels.append(lab)
        self.items = [  # (image index, y0, x0), keeping only patches with at least one label
            (i, y0, x0)
            for i, lab in enumerate(self.labels)
            for y0 in grid(lab.shape[0], patch)
            for x0 in grid(lab.shape[1], patch)
            if (lab[y0 : y0 + patch, x0 : x0 + patch] != IGNORE).any()
        ]
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        i, y0, x0 = self.items[index]
        window = (slice(y0, y0 + self.patch), slice(x0, x0 + self.patch))
        image, labels = self.images[i][window], self.labels[i][window]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            k, flip = rng.integers(4), rng.integers(2)
            image, labels = np.rot90(image, k), np.rot90(labels, k)
            if flip:
                image, labels = image[:, ::-1], labels[:, ::-1]
        return torch.from_numpy(image.copy()), torch.from_numpy(labels.copy()), index
