"""The pictures of README.md and docs/, drawn from real runs with Pillow (no plotting library).

    python figures.py method --data ROOT --tile 7 --ckpt RUN/ckpt.pt --out docs/method.png
    python figures.py curve --out docs/curve.png "10 points=RUN_A RUN_B" "dense masks=RUN_C RUN_D" ...
    python figures.py suggestions MAPS/NAME_overlay.jpg MAPS/suggestions.csv --out docs/suggestions.jpg
    python figures.py label-page DIR --points clicks.csv --ckpt RUN/ckpt.pt --out docs/label_page.png
"""
import argparse
import csv
import json
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import predict
from model import load_checkpoint
from support import layout, maps
from support.cli import command_line
from support.speed import fold_batch_norm

FONT = ImageFont.load_default(size=15)


def method(args):
    """image -> its 100 points, every other pixel no label -> U-Net -> a class for every pixel; the
    loss is computed on the points only (green: right there, red: wrong)."""
    names, colours = layout.read_classes(args.data)
    images, _, masks = layout.read_images(layout.tile_files(args.data, [args.tile])[:1], colours)
    image, mask = images[0], masks[0]  # an 8-bit RGB photo: the model takes it as it is
    y0, x0 = (mask.shape[0] - 256) // 2, (mask.shape[1] - 256) // 2
    image, mask = image[y0 : y0 + 256, x0 : x0 + 256], mask[y0 : y0 + 256, x0 : x0 + 256]
    labels = data.point_masks(data.sample_points([mask], 256, 100, seed=0)[0], [mask.shape])[0]
    model, _ = load_checkpoint(args.ckpt)
    pred = predict.predict_mask(fold_batch_norm(model), image, torch.float32)
    dimmed = (image * 0.35).astype(np.uint8)  # the ignored pixels, dark
    ys, xs = np.nonzero(labels != data.IGNORE)
    checked = Image.fromarray(np.array(maps.colourize(pred, colours).convert("RGB")))
    draw = ImageDraw.Draw(checked)
    for y, x in zip(ys, xs):
        ok = pred[y, x] == labels[y, x]
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(40, 220, 40) if ok else (230, 30, 30), width=2)
    panels = [(Image.fromarray(image), "an aerial patch, 256x256"),
              (maps.draw_points(dimmed, labels, colours), "100 clicked points; no label elsewhere"),
              (unet_sketch(), "U-Net, ResNet-34 encoder"),
              (maps.colourize(pred, colours), "a class for every pixel"),
              (checked, "pfCE on the 100 points only")]
    sheet = Image.new("RGB", (len(panels) * 296 - 40, 300), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (picture, caption) in enumerate(panels):
        sheet.paste(picture.convert("RGB"), (i * 296, 0))
        draw.text((i * 296 + 128, 270), caption, fill="black", font=FONT, anchor="ma")
        if i:
            draw.text((i * 296 - 20, 128), "->", fill="black", font=FONT, anchor="mm")
    sheet.save(args.out)


def unet_sketch():
    """Encoder stages narrowing to 1/32, decoder stages widening back, skips across: 256x256."""
    picture = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(picture)
    heights = [200, 150, 100, 60, 30]  # 1/2 ... 1/32
    for k, h in enumerate(heights):
        left, right, top = 12 + 22 * k, 222 - 22 * k, 128 - h // 2
        draw.rectangle([left, top, left + 14, top + h], fill=(90, 120, 200))  # encoder
        if k < 4:
            draw.rectangle([right, top, right + 14, top + h], fill=(230, 150, 60))  # decoder
            draw.line([left + 16, top + 6, right - 2, top + 6], fill=(120, 120, 120), width=2)  # the skip
    draw.text((128, 240), "encoder   skips   decoder", fill="black", font=FONT, anchor="mm")
    return picture


def curve(args):
    """Validation mIoU after every epoch, the mean over each group's runs (their range shaded)."""
    groups = [(g.split("=")[0], [json.loads((Path(r) / "metrics.json").read_text())["history"]
                                 for r in g.split("=")[1].split()]) for g in args.groups]
    epochs = max(len(h) for _, runs in groups for h in runs)
    w, h, left, bottom = 760, 420, 60, 40
    picture = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(picture)
    lo, hi = 0.0, max(e["miou"] for _, runs in groups for r in runs for e in r) + 0.05

    def at(epoch, v):
        x = left + (epoch - 1) * (w - left - 180) / max(epochs - 1, 1)
        return x, h - bottom - (v - lo) / (hi - lo) * (h - bottom - 20)

    for v in np.arange(0, hi, 0.1):
        draw.line([at(1, v), at(epochs, v)], fill=(225, 225, 225))
        draw.text((left - 8, at(1, v)[1]), f"{v:.1f}", fill="black", font=FONT, anchor="rm")
    for e in range(1, epochs + 1, max(1, epochs // 10)):
        draw.text((at(e, lo)[0], h - bottom + 8), str(e), fill="black", font=FONT, anchor="ma")
    draw.text((at(epochs, lo)[0] + 16, h - bottom + 8), "epoch", fill="black", font=FONT, anchor="la")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    values = [np.array([[e["miou"] for e in r[: min(map(len, runs))]] for r in runs]) for _, runs in groups]
    for k, v in enumerate(values):  # the ranges first, so that no range hides a line
        top = [at(e + 1, m) for e, m in enumerate(v.max(0))]
        bottom_edge = [at(e + 1, m) for e, m in enumerate(v.min(0))]
        draw.polygon(top + bottom_edge[::-1], fill=tuple(255 - (255 - c) // 6 for c in colours[k]))
    for k, ((name, _), v) in enumerate(zip(groups, values)):
        mean = v.mean(0)
        draw.line([at(e + 1, m) for e, m in enumerate(mean)], fill=colours[k], width=3)
        draw.text((w - 170, 30 + 22 * k), f"{name}: {mean[-1]:.3f}", fill=colours[k], font=FONT)
    draw.text((left, 4), "validation mIoU", fill="black", font=FONT)
    picture.save(args.out)


def suggestions(args):
    """predict.py's overlay with its suggested clicks ringed, 900 pixels wide."""
    picture = Image.open(args.overlay).convert("RGB")
    draw, r = ImageDraw.Draw(picture), max(10, picture.width // 60)
    for row in csv.DictReader(open(args.csv)):
        if Path(row["image"]).stem in Path(args.overlay).stem:
            x, y = int(row["x"]), int(row["y"])
            draw.ellipse([x - r, y - r, x + r, y + r], outline="black", width=r // 2)
            draw.ellipse([x - r, y - r, x + r, y + r], outline="white", width=r // 4)
    picture.resize((900, round(picture.height * 900 / picture.width)), Image.LANCZOS).save(args.out)


def label_page(args):
    """A screenshot of label.py's page with the map shown, from the browser test's code."""
    import label

    flags = [args.dir, "--points", args.points, "--ckpt", args.ckpt, "--port", "0"]
    server = label.serve(label.get_args(flags))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    label_page_screenshot(f"http://127.0.0.1:{server.server_address[1]}", args.out, args.image, (1000, 760))
    server.shutdown()


# Headless Chromium as the browser tests start it (tests/test_label_page.py uses these too)
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def open_label_page(browser, address, image=0, size=(900, 700)):
    """A new tab on label.py's page at `address`, showing image number `image` -> the page."""
    # past the page's policy: the waits below are script the tab evaluates
    page = browser.new_page(viewport={"width": size[0], "height": size[1]}, bypass_csp=True)
    page.goto(address)
    page.wait_for_function("S && picture.complete && picture.naturalWidth")
    for _ in range(image):
        page.keyboard.press("n")
    page.wait_for_function(f"cur === {image} && picture.complete && picture.naturalWidth")
    return page


def screenshot(browser, address, path, image=0, size=(900, 700)):
    """A screenshot of the page on image number `image`, with the model's map (key m) and its
    suggestions when the server has a model."""
    page = open_label_page(browser, address, image, size)
    if page.evaluate("S.model"):
        page.keyboard.press("m")
        page.wait_for_function("overlay !== null && suggestions.length > 0")
    page.screenshot(path=path)
    page.close()


def label_page_screenshot(base, path, image=0, size=(900, 700)):
    """screenshot() in a browser of its own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        screenshot(p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_FLAGS), base, path,
                   image, size)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the pictures of README.md and docs/.")
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("method", help="the method on a real patch")
    m.add_argument("--data", required=True, help="a data set in the tile layout, with masks")
    m.add_argument("--tile", type=int, default=7, help="the tile whose first image gives the patch")
    m.add_argument("--ckpt", required=True, help="a checkpoint trained on other tiles")
    c = sub.add_parser("curve", help="validation mIoU over the epochs")
    c.add_argument("groups", nargs="+", help='"name=RUN RUN ...": runs whose mean makes one line')
    s = sub.add_parser("suggestions", help="suggested clicks on predict.py's overlay")
    s.add_argument("overlay")
    s.add_argument("csv")
    lp = sub.add_parser("label-page", help="a screenshot of label.py's page")
    lp.add_argument("dir")
    lp.add_argument("--points", required=True)
    lp.add_argument("--ckpt", required=True)
    lp.add_argument("--image", type=int, default=0, help="which image of DIR, from 0")
    for q in (m, c, s, lp):
        q.add_argument("--out", required=True, help="the picture to write (.png)")
    args = p.parse_args(argv)
    {"method": method, "curve": curve, "suggestions": suggestions, "label-page": label_page}[args.what](args)


if __name__ == "__main__":
    sys.exit(command_line(main))
