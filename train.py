"""Train the ResNet-34 U-Net from point labels (or dense masks) with the pfCE loss: a plain loop.

    python train.py --epochs 5                                 # synthetic data if you have none
    python train.py --data "data/Semantic segmentation dataset" --weights none
    torchrun --nproc_per_node=2 train.py ...                    # DistributedDataParallel
"""
import argparse
import copy
import math
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
from cli import DataError, command_line, tile_list
from loss import partial_focal_ce
from model import MEAN, STD, build_model, to_input
from predict import colourize, evaluate, predict_mask, side_by_side
from runs import HERE, KAGGLE, find_data, last_checkpoint, open_run_folder, resume_state, save_run, start_processes
from speed import fold_batch_norm, keep_freed_memory, pick_dtype



def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a U-Net (ResNet-34 encoder) from point labels with pfCE.")
    add = p.add_argument
    add("--data", help=f"data set in the Kaggle layout (default: '{KAGGLE.relative_to(HERE)}' if there, "
        "else a synthetic set)")
    add("--train-tiles", default="", help="comma list of the tiles to train on (default: all but the last)")
    add("--val-tiles", default="", help="comma list of the tiles to validate on (default: the last)")
    add("--epochs", type=int, default=5, help="passes over the training patches (default: %(default)s)")
    add("--points", type=int, default=100,
        help="point labels per patch, drawn once; 0 trains on the dense masks (default: %(default)s)")
    add("--point-labels", help="CSV of real clicks (image,x,y,class) to train from instead")
    add("--batch-size", type=int, default=8,
        help="patches per step, per process under torchrun (default: %(default)s)")
    add("--lr", type=float, default=1e-3,
        help="Adam learning rate, the peak of a cosine schedule (default: %(default)s)")
    add("--lr-schedule", default="cosine", choices=["cosine", "constant"],
        help="'cosine' decays the lr to 0 over the run (default: %(default)s)")
    add("--gamma", type=float, default=2.0,
        help="focal loss exponent; 0 gives cross-entropy (default: %(default)s)")
    add("--alpha", type=float, default=0.25, help="focal loss weight (default: %(default)s)")
    add("--class-weights", default="balanced", choices=["balanced", "none"],
        help="'balanced' weighs each class by 1/sqrt of its share of the labels (default: %(default)s)")
    add("--patch", type=int, default=256,
        help="side of the square training patches, cut at native resolution (default: %(default)s)")
    add("--weights", default="imagenet",
        help="encoder init: 'imagenet', 'none' or a torchvision resnet34 .pth (default: %(default)s)")
    add("--seed", type=int, default=0,
        help="seed of the points, the init and the batch order (default: %(default)s)")
    add("--device", default="auto",
        help="'auto' (cuda, else mps, when present), 'cpu', 'cuda', ... (default: %(default)s)")
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"],
        help="'auto' times both on this machine and takes the faster (default: %(default)s)")
    add("--out", help="run folder (default: runs/<date>_<time>)")
    add("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    add("--overwrite", action="store_true", help="replace the run already in --out")
    args = p.parse_args(argv)
    check_ranges(args)
    return args


def check_ranges(args):
    """Each number as the method means it; a value out of range is one line naming the flag."""
    ranges = [  # flag, whether its value makes sense, what it must be
        ("epochs", args.epochs >= 1, "1 or more"),
        ("points", args.points >= 0, "0 (dense masks) or more"),
        ("batch_size", args.batch_size >= 1, "1 or more"),
        ("lr", 0 < args.lr < math.inf, "a number more than 0"),
        ("gamma", 0 <= args.gamma < math.inf, "0 (plain cross-entropy) or more"),
        ("alpha", 0 < args.alpha < math.inf, "more than 0 (at 0 the loss is 0: nothing is learned)"),
        ("patch", args.patch >= 32 and args.patch % 32 == 0, "a multiple of 32 (the encoder's stride)"),
        ("seed", 0 <= args.seed < 2**32, "from 0 to 2**32 - 1"),
    ]
    for name, ok, must in ranges:
        if not ok:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {must}")


class NonFiniteLoss(Exception):
    pass


# ---------------------------------------------------------------------------- the method


def make_labels(args, root, names, masks, num_classes):
    """What the model learns from -> (label maps with IGNORE where there is no label, the points or
    None): points drawn once (before any split into processes), real clicks, or the dense masks."""
    if args.point_labels:
        points = data.read_points(args.point_labels, root, names, masks, num_classes)
    elif args.points > 0:
        points, short = data.sample_points(masks, args.patch, args.points, args.seed)
        if short:
            print(f"--points {args.points}: {short} patches have fewer labelled pixels than that and use all "
                  "they have")
    else:
        return masks, None  # --points 0: the dense masks, the upper bound
    return data.point_masks(points, masks), points


def balanced_weights(labels, num_classes):
    """1/sqrt(share) of each class among the labelled pixels, scaled so the average labelled pixel
    weighs 1 (the loss keeps its scale); a class with no label gets 0."""
    counts = sum(np.bincount(lab[lab != data.IGNORE], minlength=num_classes) for lab in labels)
    share = counts / counts.sum()
    w = np.divide(1, np.sqrt(share), out=np.zeros(num_classes), where=share > 0)
    return torch.tensor(w / (w * share).sum(), dtype=torch.float32)


def train_epoch(model, loader, optimizer, device, dtype, args, epoch, names, class_weights):
    """One pass over the patches -> (mean loss, patches per second). Losses reach the host only at
    progress lines (no per-step sync on the GPU), where non-finite ones stop the run."""
    model.train()
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    loader.sampler.set_epoch(epoch)  # same order for the same seed and epoch, resumed or not
    loader.dataset.epoch = epoch
    losses, pending, seen, t0 = [], [], 0, time.time()
    every = max(10, len(loader) // 5)  # about five progress lines an epoch
    for step, (images, labels, index) in enumerate(loader, 1):
        done = epoch * len(loader) + step - 1  # steps before this one; schedules need no saved state
        if args.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * done / (args.epochs * len(loader))))
        # batch-norm statistics used by validation: the mean of the batches so far, then a moving
        # average over the last epoch (100 batches at most). PyTorch's default (0.1) follows the
        # last ten batches, a few tiles; measured on Tiles 1-6 -> 7, the change adds 0.035 mIoU
        for m in batch_norms:
            m.momentum = max(1 / min(len(loader), 100), 1 / (done + 1))
        x = to_input(images.to(device, non_blocking=True))
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = partial_focal_ce(logits, y, gamma=args.gamma, alpha=args.alpha, class_weights=class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pending.append((step, loss.detach(), index))
        seen += len(index)
        if step % every == 0 or step == len(loader):
            for (s, _, idx), v in zip(pending, torch.stack([p[1] for p in pending]).tolist()):
                if not math.isfinite(v):
                    images = ", ".join(sorted({names[loader.dataset.items[i][0]] for i in idx.tolist()}))
                    raise NonFiniteLoss(f"epoch {epoch + 1} step {s}: loss is {v}; the batch held patches "
                                        f"of {images}")
                losses.append(v)
            pending = []
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{len(loader)}  loss {np.mean(losses):.4f}  "
                  f"{seen / (time.time() - t0):.1f} patches/s")
    total = torch.tensor([sum(losses), len(losses), seen / (time.time() - t0)], dtype=torch.float64)
    if dist.is_initialized():  # the mean over every process's batches; patches/s of all together
        dist.all_reduce(total)
    return float(total[0] / total[1]), float(total[2])


def draw_points(image, labels, colours):
    """The image with each labelled pixel drawn as a 3x3 dot in its class colour."""
    dots, (h, w) = image.copy(), labels.shape
    ys, xs = np.nonzero(labels != data.IGNORE)
    colour = np.array(colours, np.uint8)[labels[ys, xs]]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            dots[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = colour
    return Image.fromarray(dots)


def write_panel(path, model, meta, image, mask, args, dtype):
    """A validation patch: image | point labels drawn on it (what --points means) | prediction | truth."""
    h, w = mask.shape
    p = min(args.patch, h, w)
    y0, x0 = (h - p) // 2, (w - p) // 2  # the centre patch
    image, mask = image[y0 : y0 + p, x0 : x0 + p], mask[y0 : y0 + p, x0 : x0 + p]
    labels = mask
    if args.points:
        labels = data.point_masks(data.sample_points([mask], p, args.points, args.seed)[0], [mask])[0]
    pred = predict_mask(model, image, meta["mean"], meta["std"], dtype)
    colours = meta["colours"]
    side_by_side([Image.fromarray(image), draw_points(image, labels, colours), colourize(pred, colours),
                  colourize(mask, colours)]).save(path)


# ---------------------------------------------------------------------------- around the method


def choose_tiles(args, root):
    """-> (training tiles, validation tiles); a tile in both is said in one warning."""
    tiles = list(data.list_tiles(root))
    train_tiles = tile_list(args.train_tiles, tiles[:-1])
    val_tiles = tile_list(args.val_tiles, tiles[-1:])
    both = sorted(set(train_tiles) & set(val_tiles))
    if both:
        print(f"warning: validation tile(s) {','.join(map(str, both))} are also trained on: their scores are "
              "optimistic (the model has seen their labels and their pixels)")
    return train_tiles, val_tiles


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


# ---------------------------------------------------------------------------- main


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    device, rank, world = start_processes(args.device)
    out, ckpt = open_run_folder(args, world)

    # data: images and dense masks of whole tiles, then the labels that are trained on
    root = find_data(args, rank, world)
    train_tiles, val_tiles = choose_tiles(args, root)
    class_names, colours = data.read_classes(root)
    names, images, masks = data.load_tiles(root, train_tiles, colours)
    _, val_images, val_masks = data.load_tiles(root, val_tiles, colours)
    check_patch(args.patch, images)
    labels, points = make_labels(args, root, names, masks, len(class_names))
    if rank == 0 and points is not None:  # the points, and what they look like on a whole image
        data.write_points(out / "points.csv", points, names)
        draw_points(images[0], labels[0], colours).save(out / "points.jpg", quality=90)
    dataset = data.PatchDataset(images, labels, args.patch, augment=True, seed=args.seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    cuda = device.type == "cuda"
    # workers only on the GPU: on the CPU they would take cores from the model; they are started
    # anew each epoch so they see the dataset's new epoch (its augmentation)
    loader = DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=4 * cuda, pin_memory=cuda)
    n_labels = sum(int((lab != data.IGNORE).sum()) for lab in dataset.labels)
    print(f"data {root}: train tiles {train_tiles} ({len(images)} images, {len(dataset)} patches, {n_labels} "
          f"labelled pixels), validate on tiles {val_tiles} ({len(val_images)} images)")
    class_weights = None
    if args.class_weights == "balanced":
        class_weights = balanced_weights(dataset.labels, len(class_names)).to(device)
        pairs = zip(class_names, class_weights.tolist())
        print("class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in pairs))

    # the model, the precision that is faster on this machine, the optimizer
    torch.manual_seed(args.seed)
    model = build_model(len(class_names), args.weights).to(device, memory_format=torch.channels_last)
    dtype = [pick_dtype(args.precision, device, model, train=True, size=args.patch) if rank == 0 else None]
    if world > 1:  # rank 0 timed it: every process trains in the precision it chose
        dist.broadcast_object_list(dtype, src=0)
    dtype = dtype[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    meta = {"classes": class_names, "colours": colours, "mean": MEAN, "std": STD, "patch": args.patch}
    history, start = resume_state(ckpt, model, optimizer, out)
    net = DistributedDataParallel(model) if world > 1 else model
    print(f"device {device}, {str(dtype)[6:]}, {world} process(es); writing to {out}")

    # the loop: an epoch of training, then (rank 0) validation on whole images, checkpoint, panel
    try:
        for epoch in range(start, args.epochs):
            t0 = time.time()
            loss, speed = train_epoch(net, loader, optimizer, device, dtype, args, epoch, names,
                                      class_weights)
            if rank == 0:
                t1 = time.time()
                folded = fold_batch_norm(copy.deepcopy(model)).eval()  # exactly what predict.py computes
                s = evaluate(folded, meta, val_images, val_masks, dtype)
                history.append({"epoch": epoch + 1, "loss": loss, "miou": s["miou"], "iou": s["iou"],
                                "pixel_acc": s["pixel_acc"], "seconds": time.time() - t0,
                                "patches_per_s": speed})
                save_run(out, model, optimizer, meta, history, args)
                write_panel(out / "panel.png", folded, meta, val_images[0], val_masks[0], args, dtype)
                print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  val mIoU {s['miou']:.3f}  "
                      f"pixel acc {s['pixel_acc']:.3f}  {speed:.1f} patches/s  train {t1 - t0:.0f}s  "
                      f"val {time.time() - t1:.0f}s")
            if world > 1:
                dist.barrier()
    except KeyboardInterrupt:
        print(f"\ninterrupted; last checkpoint: {last_checkpoint(out, history)}; continue with --resume")
        sys.exit(130)
    except NonFiniteLoss as e:
        print(f"stopped: {e}; last good checkpoint: {last_checkpoint(out, history)}")
        sys.exit(1)
    if world > 1:
        dist.destroy_process_group()
    outputs = ["ckpt.pt", "metrics.json", "panel.png", "points.csv", "points.jpg"]
    written = [out / name for name in outputs if (out / name).exists()]
    print("done: " + ", ".join(map(str, written)))
    return model


if __name__ == "__main__":
    sys.exit(command_line(main))
