"""A small synthetic aerial-like data set in the Kaggle layout, for a first run with no data at hand:
water, land, roads, buildings with shadows, vegetation, uneven light and sensor noise."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from support.layout import hex_to_rgb

SYNTHETIC_CLASSES = [  # name, mask colour (the Kaggle set's), rough ground colour in the image
    ("Water", "#E2A929", (40, 85, 120)),
    ("Land (unpaved area)", "#8429F6", (196, 170, 132)),
    ("Road", "#6EC1E4", (105, 105, 110)),
    ("Building", "#3C1098", (225, 220, 210)),
    ("Vegetation", "#FEDD3A", (70, 110, 55)),
]


def smooth_noise(rng, h, w, cells):
    """Smooth random field in [0, 1): coarse noise upsampled bilinearly."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((w, h), Image.BILINEAR)) / 256.0


def synthetic_scene(rng, h, w):
    """One aerial-like scene -> (image (h, w, 3) uint8, class map (h, w) uint8)."""
    cls = np.ones((h, w), np.uint8)  # land everywhere to start
    cls[smooth_noise(rng, h, w, 4) > 0.68] = 0  # a coast or lakes
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(2, 5)):  # straight roads across the land
        angle, offset, width = rng.uniform(0, np.pi), rng.uniform(-0.4, 0.4) * min(h, w), rng.integers(5, 13)
        dist = (xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle) - offset
        cls[(np.abs(dist) < width / 2) & (cls != 0)] = 2
    cls[(smooth_noise(rng, h, w, 8) > 0.7) & (cls == 1)] = 4  # vegetation on land
    image = np.zeros((h, w, 3), np.float32)
    for c, (_, _, colour) in enumerate(SYNTHETIC_CLASSES):
        image[cls == c] = np.array(colour) + rng.normal(0, 12, 3)  # each scene's palette varies a little
    roofs = [(225, 220, 210), (170, 90, 70), (150, 150, 160)]  # white, terracotta, grey
    for _ in range(rng.integers(60, 150)):  # buildings on free land, a shadow below and to the right
        bh, bw = rng.integers(10, 44, size=2)
        y, x = rng.integers(0, h - bh - 4), rng.integers(0, w - bw - 4)
        if (cls[y : y + bh + 4, x : x + bw + 4] == 1).all():
            image[y + 4 : y + bh + 4, x + 4 : x + bw + 4] = (90, 80, 70)  # shadow: land in the mask
            image[y : y + bh, x : x + bw] = roofs[rng.integers(3)]
            cls[y : y + bh, x : x + bw] = 3
    image += (smooth_noise(rng, h, w, 16)[..., None] - 0.5) * 40  # uneven light
    image += rng.normal(0, 10, (h, w, 3))  # sensor noise and texture
    return np.clip(image, 0, 255).astype(np.uint8), cls


def make_synthetic(root, tiles=5, per_tile=4, size=512, seed=0):
    """Write a small synthetic data set in the Kaggle layout; one mask gets a no-data border."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tmp = root.with_name(root.name + ".partial")  # renamed at the end: never half a data set
    palette = [hex_to_rgb(h) for _, h, _ in SYNTHETIC_CLASSES]
    for t in range(1, tiles + 1):
        (tmp / f"Tile {t}" / "images").mkdir(parents=True, exist_ok=True)
        (tmp / f"Tile {t}" / "masks").mkdir(parents=True, exist_ok=True)
        for k in range(1, per_tile + 1):
            image, cls = synthetic_scene(rng, size, size)
            mask = np.array(palette, np.uint8)[cls]
            if t == 1 and k == 1:  # a black no-data strip, as real masks have
                image[:, :24] = 0
                mask[:, :24] = 0
            Image.fromarray(image).save(tmp / f"Tile {t}" / "images" / f"image_part_{k:03d}.jpg", quality=90)
            Image.fromarray(mask).save(tmp / f"Tile {t}" / "masks" / f"image_part_{k:03d}.png")
    classes = [{"title": n, "shape": "polygon", "color": h} for n, h, _ in SYNTHETIC_CLASSES]
    (tmp / "classes.json").write_text(json.dumps({"classes": classes}, indent=1))
    tmp.rename(root)
    return root
