"""Train the ResNet-34 U-Net from point labels (or dense masks) with the pfCE loss: a plain loop.

    python train.py --epochs 5                                 # synthetic data if you have none
    python train.py --data "data/Semantic segmentation dataset" --weights none
    torchrun --nproc_per_node=2 train.py ...                    # DistributedDataParallel
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
from loss import partial_focal_ce
from model import (MEAN, STD, build_model, keep_freed_memory, load_checkpoint, pick_device, pick_dtype,
                   save_checkpoint, to_input)
from predict import colourize, evaluate, predict_mask, side_by_side

KAGGLE = Path(__file__).parent / "data" / "Semantic segmentation dataset"  # where the README says to unzip
SYNTHETIC = Path(__file__).parent / "data" / "synthetic"
# settings a resumed run must share with the run it continues (the rest may change: epochs, device)
SAME_ON_RESUME = ["data", "train_tiles", "val_tiles", "points", "point_labels", "batch_size", "lr", "lr_schedule",
                  "gamma", "alpha", "class_weights", "patch", "weights", "seed", "precision"]  # fmt: skip


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a U-Net (ResNet-34 encoder) from point labels with pfCE.")
    p.add_argument("--data", default=None, help=f"data set in the Kaggle layout (default: '{KAGGLE.relative_to(Path(__file__).parent)}' if there, else a synthetic set)")
    p.add_argument("--train-tiles", default="", help="comma list of tile numbers to train on (default: all but the last)")
    p.add_argument("--val-tiles", default="", help="comma list of tile numbers to validate on (default: the last)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training patches (default: %(default)s)")
    p.add_argument("--points", type=int, default=100, help="point labels per patch, drawn once; 0 trains on the dense masks (default: %(default)s)")
    p.add_argument("--point-labels", default=None, help="CSV of real clicks (image,x,y,class) to train from instead")
    p.add_argument("--batch-size", type=int, default=8, help="patches per step, per process under torchrun (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, the peak of a cosine schedule (default: %(default)s)")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"], help="'cosine' decays the lr to 0 over the run (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=2.0, help="focal loss exponent; 0 gives cross-entropy (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.25, help="focal loss weight (default: %(default)s)")
    p.add_argument("--class-weights", default="balanced", choices=["balanced", "none"],
                   help="'balanced' weighs each class by 1/sqrt of its share of the labels (default: %(default)s)")  # fmt: skip
    p.add_argument("--patch", type=int, default=256, help="side of the square training patches, cut at native resolution (default: %(default)s)")
    p.add_argument("--weights", default="imagenet", help="encoder init: 'imagenet', 'none' or a torchvision resnet34 .pth (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the points, the init and the batch order (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (cuda when present), 'cpu', 'cuda', ... (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="'auto' is bf16 where the hardware has it natively, else fp32 (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date>_<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    args = p.parse_args(argv)
    if args.patch < 32 or args.patch % 32:
        p.error("--patch must be a multiple of 32 (the encoder's stride)")
    return args


class NonFiniteLoss(Exception):
    pass


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
                    raise NonFiniteLoss(f"epoch {epoch + 1} step {s}: loss is {v}; the batch held patches of {images}")
                losses.append(v)
            pending = []
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{len(loader)}  loss {np.mean(losses):.4f}  {seen / (time.time() - t0):.1f} patches/s")
    total = torch.tensor([sum(losses), len(losses), seen / (time.time() - t0)], dtype=torch.float64)
    if dist.is_initialized():  # the mean over every process's batches; patches/s of all together
        dist.all_reduce(total)
    return float(total[0] / total[1]), float(total[2])


def write_panel(path, model, meta, image, mask, args, dtype):
    """A validation patch: image | point labels drawn on it (what --points means) | prediction | truth."""
    h, w = mask.shape
    p = min(args.patch, h, w)
    y0, x0 = (h - p) // 2, (w - p) // 2  # the centre patch
    image, mask = image[y0 : y0 + p, x0 : x0 + p], mask[y0 : y0 + p, x0 : x0 + p]
    labels = data.point_masks(data.sample_points([mask], p, args.points, args.seed)[0], [mask]) if args.points else [mask]
    dots = image.copy()
    ys, xs = np.nonzero(labels[0] != data.IGNORE)
    colours = np.array(meta["colours"], np.uint8)
    for dy in (-1, 0, 1):  # 3x3 dots in the class colour
        for dx in (-1, 0, 1):
            dots[np.clip(ys + dy, 0, p - 1), np.clip(xs + dx, 0, p - 1)] = colours[labels[0][ys, xs]]
    pred = predict_mask(model, image, meta["mean"], meta["std"], dtype)
    panels = [Image.fromarray(image), Image.fromarray(dots), colourize(pred, meta["colours"]), colourize(mask, meta["colours"])]
    side_by_side(panels).save(path)


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    device = pick_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # started by torchrun: one process per GPU (nccl) or per CPU share (gloo)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if rank > 0:  # rank 0 alone prints
        sys.stdout = open(os.devnull, "w")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    # where the run goes, and what may already be there
    out = Path(args.out or time.strftime("runs/%Y-%m-%d_%H-%M-%S"))
    args.out = str(out)
    ckpt_path = out / "ckpt.pt"
    if args.resume:
        if not ckpt_path.exists():
            raise data.DataError(f"{out}: no finished epoch to resume (no ckpt.pt); start it again with --overwrite")
        _, ckpt = load_checkpoint(ckpt_path, mmap=False)  # on the CPU: load_state_dict below moves it
        for k in SAME_ON_RESUME:
            if getattr(args, k) != ckpt["args"][k]:
                raise data.DataError(f"--resume: --{k.replace('_', '-')} {getattr(args, k)} differs from the run's {ckpt['args'][k]}")
    elif (ckpt_path.exists() or (out / "points.csv").exists()) and not args.overwrite:
        raise data.DataError(f"{out}: already holds a run; add --resume to continue it or --overwrite to replace it")
    if world > 1:
        dist.barrier()  # every process has looked at --out before anyone writes there

    # data: the user's, else the Kaggle set where the README says to unzip it, else synthetic
    root = args.data or (KAGGLE if KAGGLE.is_dir() else SYNTHETIC)
    if args.data is None and root == SYNTHETIC:
        if not (SYNTHETIC / "classes.json").exists() and rank == 0:
            data.make_synthetic(SYNTHETIC)
        if world > 1:
            dist.barrier()  # the other processes wait for rank 0 to write it
        print(f"no --data and no '{KAGGLE}': training on the synthetic set in {SYNTHETIC} (see README for real data)")
    tiles = list(data.list_tiles(root))
    class_names, colours = data.read_classes(root)
    train_tiles = data.tile_list(args.train_tiles, tiles[:-1])
    val_tiles = data.tile_list(args.val_tiles, tiles[-1:])
    names, images, masks = data.load_tiles(root, train_tiles, colours)
    _, val_images, val_masks = data.load_tiles(root, val_tiles, colours)

    # labels: points drawn once before any split into processes, or real clicks, or dense masks
    if args.point_labels:
        points = data.read_points(args.point_labels, root, names, masks, len(class_names))
    elif args.points > 0:
        points, short = data.sample_points(masks, args.patch, args.points, args.seed)
        if short:
            print(f"--points {args.points}: {short} patches have fewer labelled pixels than that and use all they have")
    else:
        points = None  # --points 0: the dense masks, the upper bound
    labels = masks if points is None else data.point_masks(points, masks)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and points is not None:
        data.write_points(out / "points.csv", points, names)

    dataset = data.PatchDataset(images, labels, args.patch, augment=True, seed=args.seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    cuda = device.type == "cuda"
    # workers only on the GPU: on the CPU they would take cores from the model; they are started
    # anew each epoch so they see the dataset's new epoch (its augmentation)
    loader = DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=4 if cuda else 0, pin_memory=cuda)
    n_labels = sum(int((lab != data.IGNORE).sum()) for lab in dataset.labels)
    print(f"data {root}: train tiles {train_tiles} ({len(images)} images, {len(dataset)} patches, {n_labels} labelled pixels)"
        f", validate on tiles {val_tiles} ({len(val_images)} images)")  # fmt: skip
    class_weights = None
    if args.class_weights == "balanced":
        class_weights = balanced_weights(dataset.labels, len(class_names)).to(device)
        print("class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(class_names, class_weights.tolist())))

    torch.manual_seed(args.seed)
    model = build_model(len(class_names), args.weights).to(device, memory_format=torch.channels_last)
    dtype = [pick_dtype(args.precision, device, model, train=True, size=args.patch) if rank == 0 else None]
    if world > 1:  # rank 0 timed it: every process trains in the precision it chose
        dist.broadcast_object_list(dtype, src=0)
    dtype = dtype[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    meta = {"classes": class_names, "colours": colours, "mean": MEAN, "std": STD, "patch": args.patch}
    history, start = [], 0
    if args.resume:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, start = ckpt["history"], ckpt["epoch"]
        print(f"resuming {out} after epoch {start}")
    net = DistributedDataParallel(model) if world > 1 else model
    print(f"device {device}, {str(dtype).replace('torch.', '')}, {world} process(es); writing to {out}")

    try:
        for epoch in range(start, args.epochs):
            t0 = time.time()
            loss, speed = train_epoch(net, loader, optimizer, device, dtype, args, epoch, names, class_weights)
            if rank == 0:
                model.eval()
                t1 = time.time()
                s = evaluate(model, meta, val_images, val_masks, dtype)
                history.append({"epoch": epoch + 1, "loss": loss, "miou": s["miou"], "iou": s["iou"],
                                "pixel_acc": s["pixel_acc"], "seconds": time.time() - t0, "patches_per_s": speed})  # fmt: skip
                save_checkpoint(ckpt_path, {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "epoch": epoch + 1, "history": history, "args": vars(args)})  # fmt: skip
                tmp = out / "metrics.json.tmp"
                tmp.write_text(json.dumps({"history": history}, indent=1))
                tmp.replace(out / "metrics.json")
                write_panel(out / "panel.png", model, meta, val_images[0], val_masks[0], args, dtype)
                print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  val mIoU {s['miou']:.3f}  pixel acc "
                    f"{s['pixel_acc']:.3f}  {speed:.1f} patches/s  train {t1 - t0:.0f}s  val {time.time() - t1:.0f}s")  # fmt: skip
            if world > 1:
                dist.barrier()
    except KeyboardInterrupt:
        done = f"{ckpt_path} (after epoch {history[-1]['epoch']})" if history else "none (no epoch finished)"
        print(f"\ninterrupted; last checkpoint: {done}; continue with --resume")
        sys.exit(130)
    except NonFiniteLoss as e:
        done = f"{ckpt_path} (after epoch {history[-1]['epoch']})" if history else "none"
        print(f"stopped: {e}; last good checkpoint: {done}")
        sys.exit(1)
    if world > 1:
        dist.destroy_process_group()
    print(f"done: {ckpt_path}, {out / 'metrics.json'}, {out / 'panel.png'}")
    return model


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the first epoch: nothing was written yet
        print("\ninterrupted before training started", file=sys.stderr)
        sys.exit(130)
