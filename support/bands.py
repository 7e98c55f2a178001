"""Bands and their scale: how a scene's samples are fed to the network (one scale for every scene,
kept in the checkpoint), and what a person is shown of them."""
import math

import numpy as np
import torch

from support.cli import DataError

# the encoder's ImageNet weights expect 8-bit RGB divided by 255 and normalised with ImageNet's
# statistics; RGB photos are fed so whether or not the weights are used. Other images (16-bit, float,
# other than 3 bands) are normalised per band with the mean and std of the training images instead.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_input(images, norm="imagenet"):
    """(B, H, W, bands) samples -> normalised (B, bands, H, W) float32, channels_last in memory (the
    permute is free: channels_last is exactly the layout the images already have). norm: 'imagenet'
    for 8-bit RGB, else {"mean": [...], "std": [...]} per band, in the samples' own units."""
    x = images.permute(0, 3, 1, 2).float()
    if norm == "imagenet":
        x, mean, std = x.div_(255), MEAN, STD
    else:
        mean, std = norm["mean"], norm["std"]
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def input_norm(images, valids):
    """How a data set is fed to the network: 'imagenet' when every image is 8-bit RGB (what the
    encoder's weights were trained on), else the mean and std of each band over the training images'
    valid pixels: one scale for every scene, so the same reflectance is the same input everywhere."""
    if all(im.dtype == np.uint8 and im.shape[2] == 3 for im in images):
        return "imagenet"
    return band_statistics(images, valids)


def input_plan(n, kind, meta, bands=None):
    """A scene of n bands of sample type `kind` -> how the checkpoint's model is fed it: (the scene's bands
    the model takes, counted from 1: its own, or `bands` in their place; the norm for to_input; whether
    it is given the picture a person sees of those bands instead). Checkpoints without a norm were
    trained on each scene stretched to 8-bit RGB: such a scene is what they are given. Says once what
    does not fit."""
    if "norm" not in meta:
        if bands and len(bands) not in (1, 3):
            raise DataError(f"--bands {','.join(map(str, bands))}: this checkpoint takes 1 band (grey) or 3")
        return bands or meta.get("bands"), "imagenet", True
    trained = meta["bands"]
    if meta["norm"] == "imagenet" and (kind != np.uint8 or n != 3):  # a model of 8-bit RGB photos sees such
        print(f"{n} band(s) of {kind}: the model's were 8-bit RGB; it is given the picture a person sees")
        return bands or (trained if n >= 3 else None), "imagenet", True
    if meta["norm"] != "imagenet" and kind != np.dtype(meta["dtype"]):  # reflectance as 0-1 or as 0-10000?
        print(f"warning: {kind} samples, the model learnt from {meta['dtype']}: if their units differ, so "
              "does the map")
    if bands and len(bands) != len(trained):
        raise DataError(f"--bands {','.join(map(str, bands))}: the model takes {len(trained)} bands")
    if not bands and meta["args"].get("bands") is None and n != len(trained):  # trained on all bands
        raise DataError(f"has {n} band(s), the model's images had {len(trained)} (choose some with --bands)")
    bands = bands or trained
    if max(bands) > n:
        raise DataError(f"has {n} band(s), the model takes bands {','.join(map(str, bands))}")
    return bands, meta["norm"], False


def model_input(samples, valid, plan):
    """A scene's samples (or a window of them) and where they hold data -> the samples as the model takes
    them: input_plan's bands, no data set to what normalises to 0; or the picture a person sees."""
    bands, norm, picture = plan
    if picture:
        return display(samples, valid, bands)
    n = samples.shape[2]
    picked = samples if bands == list(range(1, n + 1)) else samples[..., [b - 1 for b in bands]]
    return fill_no_data(picked, valid, no_data_value(norm))


def band_spread(norm):
    """Each band's spread in the samples' own units, for colour jitter: 4 standard deviations (about 230
    for 8-bit RGB under ImageNet's statistics, nearly the whole 0-255)."""
    return 4 * (np.array(STD) * 255 if norm == "imagenet" else np.array(norm["std"]))


def no_data_value(norm):
    """The sample values that `norm` turns into 0: the data set's average pixel."""
    return np.array(MEAN) * 255 if norm == "imagenet" else np.array(norm["mean"])


def display(samples, valid, show=None, low=2, high=98):
    """What a person is shown: three bands (`show`, counted from 1; by default 1,2,3, or band 1 as grey
    where there are fewer) as 8-bit RGB; other than 8-bit, each stretched between its percentiles `low`
    and `high` over the scene's valid pixels, as GIS tools show 16-bit and float imagery; no data black."""
    n = samples.shape[2]
    show = show or ([1, 2, 3] if n >= 3 else [1, 1, 1])
    if max(show) > n:
        raise DataError(f"--show-bands {','.join(map(str, show))}: the scene has {n} band(s)")
    picked = [b - 1 for b in (show * 3 if len(show) == 1 else show)]
    if samples.dtype == np.uint8:
        out = samples if picked == [0, 1, 2] and n == 3 else samples[..., picked]  # no copy of a photo
    else:
        step = max(1, int(math.sqrt(samples.shape[0] * samples.shape[1] / 1e6)))  # a million pixels suffice
        sub = samples[::step, ::step][..., picked].reshape(-1, 3)
        if valid is not None:
            sub = sub[valid[::step, ::step].reshape(-1)]
        lo, hi = np.percentile(sub, [low, high], axis=0) if len(sub) else (np.zeros(3), np.ones(3))
        scale = 255 / np.maximum(hi - lo, 1e-12)
        out = np.empty(samples.shape[:2] + (3,), np.uint8)
        for y in range(0, len(samples), 256):  # in strips: a float copy of a whole scene could be gigabytes
            strip = (samples[y : y + 256, :, picked] - lo) * scale
            out[y : y + 256] = np.clip(strip, 0, 255).astype(np.uint8)
    if valid is not None:
        out = np.where(valid[..., None], out, np.uint8(0))
    return np.ascontiguousarray(out)


def band_statistics(images, valids):
    """Each band's mean and standard deviation over the valid pixels of all `images` (a million pixels
    of each suffice), the data set's one scale for every scene -> {"mean": [...], "std": [...]}."""
    total, squares, count = 0.0, 0.0, 0
    for image, valid in zip(images, valids):
        step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / 1e6)))
        sub = image[::step, ::step].reshape(-1, image.shape[2]).astype(np.float64)
        if valid is not None:
            sub = sub[valid[::step, ::step].reshape(-1)]
        total, squares, count = total + sub.sum(0), squares + (sub**2).sum(0), count + len(sub)
    if count == 0:
        raise DataError("the training images hold no pixel with data")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0))
    return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist()}  # a constant band: no division by 0


def fill_no_data(samples, valid, values):
    """Write `values` (one per band: those the model's normalisation turns into 0) into the pixels with
    no data, in place where it can: the network then sees no data as the data set's average, not as
    black -> the samples."""
    if valid is not None:
        samples = samples if samples.flags.writeable else samples.copy()  # Pillow's pixels are read-only
        samples[~valid] = np.asarray(values).round() if samples.dtype.kind in "ui" else values
    return samples
