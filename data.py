"""Weak labels: a handful of labelled pixels per patch, every other pixel "no label" (IGNORE).

Where dense masks exist, the points are drawn from them, as an annotator's clicks would be: n per
256x256 patch, once, without replacement, only on pixels whose class is known. Real clicks come in
through support/clicks.py. Either way the label map of an image is IGNORE everywhere but at its points, and
the training patches are cut from images and label maps together.
"""
import numpy as np
import torch

from support import IGNORE  # 255: the label of pixels that carry no class: unlabelled, no data, padding


def sample_points(masks, patch, n, seed):
    """n points per grid patch, drawn once, without replacement, only on pixels with a class.

    The budget is per patch of the grid, so it follows the patch size: at --patch 512 a patch holds
    four times the pixels of one at 256, and the same n is a quarter of the clicks per pixel.
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


def grid(size, patch):
    """Start offsets of patches covering [0, size): a regular grid, the last one flush with the end."""
    if size <= patch:
        return [0]
    return list(range(0, size - patch, patch)) + [size - patch]


def point_masks(points, shapes):
    """Sparse label maps of the given (H, W) shapes: IGNORE everywhere but at the points.

    A stroke or polygon comes here as every pixel it covers, and each counts once in pfCE's mean, as a
    click does: a stroke of 300 neighbouring pixels weighs as 300 independent clicks would, though,
    alike as neighbours are, its pixels tell the model far less each."""
    sparse = [np.full(shape, IGNORE, np.uint8) for shape in shapes]
    for i, x, y, c in points:
        sparse[i][y, x] = c
    return sparse


class PatchDataset(torch.utils.data.Dataset):
    """Grid patches of in-memory images -> (image (P, P, bands), float32 once jittered, labels (P, P), index).

    Augmentation (a random flip and 90-degree rotation, the same for image and labels; with `jitter`,
    colour: each band times U(1 - jitter, 1 + jitter) plus U(-jitter, jitter) times its `spread`, in
    sample units) is a pure function of (seed, epoch, index), so any number of workers, processes or a
    resumed run see exactly the same batches.
    """

    def __init__(self, images, labels, patch, augment=True, seed=0, jitter=0.0, spread=None):
        if jitter and spread is None:
            raise ValueError("jitter needs each band's spread (support.bands.band_spread)")
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
        self.augment, self.seed, self.epoch, self.jitter, self.spread = augment, seed, 0, jitter, spread

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
            if self.jitter:  # the light and the sensor of another image: each band's gain and offset
                j, bands = self.jitter, image.shape[2]
                gain, shift = rng.uniform(1 - j, 1 + j, bands), rng.uniform(-j, j, bands) * self.spread
                image = (image * gain + shift).astype(np.float32)
        return torch.from_numpy(image.copy()), torch.from_numpy(labels.copy()), index


def pad_to(image, mask, patch):
    """Pad an image smaller than a patch (mirrored pixels) and its mask (IGNORE) up to the patch size."""
    h, w = mask.shape
    ph, pw = max(patch - h, 0), max(patch - w, 0)
    if ph == pw == 0:
        return image, mask
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return image, np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
