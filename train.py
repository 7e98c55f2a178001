"""Train the U-Net from point labels with the pfCE loss: a plain loop over patches, then validation on
whole images after each epoch.

    python train.py --epochs 5                                  # a synthetic set if you have no data
    python train.py --data ../shared/data/dubai-aerial --weights none
    python train.py --data my_images --point-labels clicks.csv  # your own images and clicks
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
import predict
from loss import partial_focal_ce
from model import build_model
from support import layout, maps, runs
from support.bands import band_spread, display, to_input
from support.cli import DataError, band_list, command_line, written
from support.speed import choose_precision, fold_batch_norm, fold_upsampling, keep_freed_memory


def train_epoch(model, loader, optimizer, device, dtype, norm, args, epoch, class_weights, ema=None):
    """One pass over the patches -> (mean loss, patches per second). norm: how the samples are
    normalised (support.bands.to_input). With `ema`, a moving average of the weights follows each step."""
    model.train()
    loader.sampler.set_epoch(epoch)  # the same order for the same seed and epoch, resumed or not
    loader.dataset.epoch = epoch  # and the same augmentation
    steps, losses, pending, seen, t0 = len(loader), [], [], 0, time.time()
    for step, (images, labels, index) in enumerate(loader, 1):
        done = epoch * steps + step - 1  # steps before this one: the schedules need no saved state
        for group in optimizer.param_groups:
            group["lr"] = get_lr(done, args.epochs * steps, args.lr, args.lr_schedule)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = batch_norm_momentum(done, steps)
        x = to_input(images.to(device, non_blocking=True), norm)  # (B, bands, P, P) normalised
        y = labels.to(device, non_blocking=True)  # (B, P, P) class or IGNORE
        if args.cutmix:
            x, y = cut_mix(x, y, args.cutmix, np.random.default_rng([args.seed, epoch, step]))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)  # (B, C, P, P)
        loss = partial_focal_ce(logits, y, gamma=args.gamma, alpha=args.alpha, class_weights=class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, ema_decay(done, args.ema))
        pending.append((step, loss.detach(), index))  # read on the host only at progress lines: no sync
        seen += len(index)
        if step % max(10, steps // 5) == 0 or step == steps:  # about five progress lines an epoch
            losses += runs.finite_losses(pending, loader.dataset, epoch)
            pending = []
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{steps}  loss {np.mean(losses):.4f}  "
                  f"{seen / (time.time() - t0):.1f} patches/s")
    total = torch.tensor([sum(losses), len(losses), seen / (time.time() - t0)], dtype=torch.float64)
    if dist.is_initialized():  # the mean over every process's batches; patches/s of all together
        dist.all_reduce(total)
    return float(total[0] / total[1]), float(total[2])


def cut_mix(x, y, p, rng):
    """CutMix (Yun et al. 2019): each patch of the batch, with probability p, gets a box of the next
    patch pasted in, image and labels alike, the box a share U(0, 1) of the patch. A pixel's
    surroundings then often come from another image, so the network cannot lean on them alone
    (measured in docs/results.md)."""
    n, _, h, w = x.shape
    x0, y0 = x.clone(), y.clone()
    for i in range(n):
        if n > 1 and rng.random() < p:
            side = math.sqrt(rng.random())  # the box's side, as a share of the patch's
            bh, bw = int(h * side), int(w * side)
            r, c, j = rng.integers(h - bh + 1), rng.integers(w - bw + 1), (i + 1) % n
            x[i, :, r : r + bh, c : c + bw] = x0[j, :, r : r + bh, c : c + bw]
            y[i, r : r + bh, c : c + bw] = y0[j, r : r + bh, c : c + bw]
    return x, y


def get_lr(step, total_steps, peak, schedule):
    """'cosine': from the peak down to 0 over the run, along half a cosine; 'constant': the peak."""
    if schedule == "constant":
        return peak
    return peak * 0.5 * (1 + math.cos(math.pi * step / total_steps))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for the weights and the batch-norm statistics alike:
    an average over the last ~1 / (1 - decay) steps, which smooths the step-to-step noise of a long
    run (measured in docs/budget.md)."""
    model = getattr(model, "module", model)  # under torchrun, the model inside DistributedDataParallel
    for a, b in zip(ema.state_dict().values(), model.state_dict().values()):
        if a.is_floating_point():
            a.lerp_(b, 1 - decay)
        else:
            a.copy_(b)  # the count of batches seen


def ema_decay(step, decay):
    """The moving average's decay after `step` earlier steps: at most `decay`, and step / (step + 9) while
    the run is young (TensorFlow's num_updates rule). The first step is copied, leaving the random init
    out, and the average spans about the last ninth of the steps so far: a run of 40 steps at 0.998 ends
    on its last few steps, not on 92% of its first step's weights (0.998^39)."""
    return min(decay, step / (step + 9))


def batch_norm_momentum(step, steps_per_epoch):
    """Batch norm normalises with statistics of the batch while training, and at inference with
    running averages of them kept along the way. PyTorch's default (momentum 0.1) follows the last
    ten batches, a few tiles of 8 patches; here the average is over every batch so far, then over
    about the last epoch (100 batches at most). Measured on Tiles 1-6 -> 7, this adds 0.035 mIoU.
    An epoch of fewer than 16 batches starts them afresh as the plain mean of its batches: at 2 steps
    an epoch, momentum 1/2 would keep half of the last batch, and the score swings from epoch to epoch."""
    if steps_per_epoch < 16:
        return 1 / (step % steps_per_epoch + 1)
    return max(1 / min(steps_per_epoch, 100), 1 / (step + 1))


def balanced_weights(labels, num_classes):
    """1/sqrt(share) of each class among the labelled pixels, scaled so the average labelled pixel
    weighs 1 (the loss keeps its scale); a class with no label gets 0."""
    counts = sum(np.bincount(lab[lab != data.IGNORE], minlength=num_classes) for lab in labels)
    share = counts / counts.sum()
    w = np.divide(1, np.sqrt(share), out=np.zeros(num_classes), where=share > 0)
    return torch.tensor(w / (w * share).sum(), dtype=torch.float32)


def make_labels(args, d):
    """What the model learns from -> (label maps, IGNORE where there is no label; the points or
    None): the user's clicks, points drawn once from the dense masks (before any split into
    processes), or with --points 0 the dense masks themselves, the upper bound."""
    if d["points"] is not None:
        points = d["points"]
    elif args.points > 0:
        points, short = data.sample_points(d["masks"], args.patch, args.points, args.seed)
        if short:
            print(f"--points {args.points}: {short} patches have fewer labelled pixels than that and use all "
                  "they have")
    else:
        return d["masks"], None
    return data.point_masks(points, [im.shape[:2] for im in d["images"]]), points


def validate(model, meta, val, dtype):
    """Scores on the validation images of a batch-norm-folded copy, exactly what predict.py computes:
    mIoU and pixel accuracy against dense masks, click scores against held-out clicks."""
    folded = fold_batch_norm(copy.deepcopy(model)).eval()
    s, n = {}, len(meta["classes"])
    for dense in (True, False):
        part = [(image, truth) for _, image, _, truth, is_dense in val if is_dense == dense]
        if part:
            conf = predict.evaluate(folded, *zip(*part), dtype, n, norm=meta["norm"])
            score = predict.scores if dense else predict.click_scores
            s.update(score(conf, meta["classes"]))
    s.pop("confusion", None)
    return s, folded


# ---------------------------------------------------------------------------- what a run shows


def write_panel(path, model, meta, val, args, dtype):
    """A validation patch: image | labels drawn on it | prediction | truth. Dense masks: the centre
    patch, with the points --points would draw there (none in a run from clicks). Held-out clicks:
    the patch around the first, with the clicks."""
    _, image, valid, truth, dense = val
    h, w = truth.shape
    p = min(args.patch, h, w)
    y0, x0 = (h - p) // 2, (w - p) // 2  # the centre patch
    if not dense:
        ys, xs = np.nonzero(truth != data.IGNORE)
        y0, x0 = min(max(ys[0] - p // 2, 0), h - p), min(max(xs[0] - p // 2, 0), w - p)
    pred = predict.predict_mask(model, image[y0 : y0 + p, x0 : x0 + p], dtype, norm=meta["norm"])
    image = display(image, valid, meta["show_bands"])[y0 : y0 + p, x0 : x0 + p]  # what a person sees
    truth = truth[y0 : y0 + p, x0 : x0 + p]
    labels = truth  # the held-out clicks, or with --points 0 every pixel
    if dense and args.point_labels:
        labels = np.full_like(truth, data.IGNORE)
    elif dense and args.points:
        labels = data.point_masks(data.sample_points([truth], p, args.points, args.seed)[0], [truth.shape])[0]
    colours = meta["colours"]
    panels = [Image.fromarray(image), maps.draw_points(image, labels, colours), maps.colourize(pred, colours)]
    with written(path) as tmp:
        maps.side_by_side(panels + [maps.colourize(truth, colours)] if dense else panels).save(tmp)


def epoch_line(epoch, args, loss, s, speed, seconds):
    scores = ""
    if "miou" in s:
        scores += f"  val mIoU {s['miou']:.3f}  pixel acc {s['pixel_acc']:.3f}"
    if "click_accuracy" in s:
        scores += f"  held-out clicks {s['click_count']}: accuracy {s['click_accuracy']:.3f}"
    train_s, val_s = seconds
    return (f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}{scores}  {speed:.1f} patches/s  "
            f"train {train_s:.0f}s  val {val_s:.0f}s")


# ---------------------------------------------------------------------------- main


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    device, rank, world = runs.start_processes(args.device)
    with runs.run_folder(args, world, vars(get_args([]))) as (out, ckpt):  # held: no other run writes there
        return run(args, device, rank, world, out, ckpt)


def run(args, device, rank, world, out, ckpt):
    """The data, the model and the loop, writing to the run folder `out`; ckpt: the run to resume."""
    # data: the images, the labels they are trained on, and what validation scores against
    root = runs.find_data(args, rank, world)
    d = layout.run_data(args, root)
    layout.check_patch(args.patch, d["images"])
    labels, points = make_labels(args, d)
    dataset = data.PatchDataset(d["images"], labels, args.patch, augment=True, seed=args.seed,
                                jitter=args.jitter, spread=band_spread(d["norm"]))
    loader = make_loader(dataset, args, device, rank, world)
    n_labels = sum(int((lab != data.IGNORE).sum()) for lab in dataset.labels)
    n_dense = sum(dense for *_, dense in d["val"])
    print(f"data {root}: training on {len(d['images'])} images ({len(dataset)} patches, {n_labels} labelled "
          f"pixels), validating on {n_dense} with masks and {len(d['val']) - n_dense} with held-out clicks")
    check_labels(n_labels, args)
    class_weights = None
    if args.class_weights == "balanced":
        class_weights = balanced_weights(dataset.labels, len(d["classes"])).to(device)
        pairs = zip(d["classes"], class_weights.tolist())
        print("class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in pairs))

    # the model (its first layer takes the images' bands), the precision faster here, the optimizer
    torch.manual_seed(args.seed)
    model = build_model(len(d["classes"]), args.weights, len(d["bands"]))
    model = fold_upsampling(model).to(device, memory_format=torch.channels_last)  # speed: support/speed.py
    dtype = choose_precision(args, ckpt, device, model, rank, world)
    # fused: one kernel updates every weight (34 ms a step instead of 82 on 2 cores of a Xeon)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    meta = {"classes": d["classes"], "colours": d["colours"], "patch": args.patch, "bands": d["bands"],
            "norm": d["norm"], "dtype": str(d["images"][0].dtype), "show_bands": args.show_bands,
            "precision": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]}
    ema = copy.deepcopy(model) if args.ema else None  # with --ema, the weights validated and saved
    history, start = runs.resume_state(ckpt, meta, model, optimizer, out, ema)
    shown = model if ema is None else ema
    net = DistributedDataParallel(model) if world > 1 else model
    if rank == 0:  # every input is checked: the run folder is written from here on
        runs.write_labels(out, d, labels, points, args.show_bands)
    print(f"device {device}, {str(dtype)[6:]}, {world} process(es); writing to {out}")

    # the loop: an epoch of training, then (rank 0) validation on whole images, checkpoint, panel
    try:
        for epoch in range(start, args.epochs):
            t0 = time.time()
            loss, speed = train_epoch(net, loader, optimizer, device, dtype, d["norm"], args, epoch,
                                      class_weights, ema)
            if rank == 0:
                t1 = time.time()
                s, folded = validate(shown, meta, d["val"], dtype)
                history.append({"epoch": epoch + 1, "loss": loss, **s, "seconds": time.time() - t0,
                                "patches_per_s": speed})
                runs.save_run(out, model, optimizer, meta, history, args, ema)
                if d["val"]:
                    write_panel(out / "panel.png", folded, meta, d["val"][0], args, dtype)
                print(epoch_line(epoch, args, loss, s, speed, (t1 - t0, time.time() - t1)))
            if world > 1:
                dist.barrier()
    except KeyboardInterrupt:
        print(f"\ninterrupted; last checkpoint: {runs.last_checkpoint(out, history)}; continue with --resume")
        sys.exit(130)
    except runs.NonFiniteLoss as e:
        images = ", ".join(d["names"][i] for i in e.images)
        print(f"stopped: {e}; the batch held patches of {images}; last good checkpoint: "
              f"{runs.last_checkpoint(out, history)}")
        sys.exit(1)
    if world > 1:
        dist.destroy_process_group()
    print("done: " + ", ".join(str(out / name) for name in runs.OUTPUTS if (out / name).exists()))
    return shown


# ---------------------------------------------------------------------------- around the method


def check_labels(n_labels, args):
    """A run with no labelled pixel would learn nothing and say "done": refused before anything is written."""
    if n_labels == 0:
        raise DataError("no training pixel has a label: nothing to learn from; see " + ("its clicks" if
                        args.point_labels else "its masks (do their colours or values match classes.json?)"))


def make_loader(dataset, args, device, rank, world):
    """Batches of patches, shuffled by (seed, epoch); under torchrun each process gets its share."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    cuda = device.type == "cuda"
    # workers only on the GPU: on the CPU they would take cores from the model; they are started
    # anew each epoch so they see the dataset's new epoch (its augmentation)
    return DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=4 * cuda, pin_memory=cuda)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a U-Net (ResNet-34 encoder) from point labels with pfCE.")
    add = p.add_argument
    add("--data", help=f"a folder of images (the Kaggle tile layout or any other; default: "
        f"'{runs.KAGGLE.relative_to(runs.HERE)}' if there, else a synthetic set)")
    add("--point-labels", "--labels", nargs="+", metavar="FILE",
        help="your labels: CSV image,x,y,class in pixels (strokes and polygons as runs of rows), or a layer "
        "of points, lines and polygons in map coordinates (GeoJSON; GeoPackage, FILE.gpkg:LAYER, shapefile, "
        "KML, FlatGeobuf, GeoJSONSeq); several files add up (default: points drawn from the dense masks)")
    add("--line-width", type=float, default=3, help="width in pixels of the lines and strokes of --point-"
        "labels: they label the pixels whose centre lies within half of it (default: %(default)s)")
    add("--class-field", help="the layer's field or CSV column of the class (default: class, class_name, "
        "label or class_id)")
    add("--points", type=int, default=100,
        help="points per patch drawn from the dense masks, once; 0 trains on the dense masks (default: "
        "%(default)s)")
    add("--train-tiles", default="", help="comma list of the tiles to train on (default: all but the last)")
    add("--val-tiles", default="", help="comma list of the tiles to validate on (default: the last)")
    add("--val-images", type=int, help="in a folder without tiles, how many labelled images, chosen by the "
        "seed, are held out whole for validation (default: a fifth, at least 1 of 2 or more)")
    add("--bands", default="", help="the bands the network learns from, counted from 1, e.g. 1,2,3,4 "
        "(default: all the images' bands)")
    add("--show-bands", default="", help="the bands shown as red,green,blue in the run's pictures, e.g. "
        "4,1,2 for false colour; kept for predict.py and label.py (default: 1,2,3, or band 1 as grey)")
    add("--aoi", metavar="FILE", help="an area of interest, a layer of polygons (GeoJSON, GeoPackage, "
        "shapefile, KML, FlatGeobuf): pixels outside it are no data, neither trained on nor scored")
    add("--points-crs", help="the coordinate system of a CSV's x,y map coordinates (no image column), e.g. "
        "EPSG:32640; lon,lat columns are EPSG:4326 (needs pyproj)")
    add("--epochs", type=int, default=5, help="passes over the training patches (default: %(default)s)")
    add("--batch-size", type=int, default=8,
        help="patches per step, per process under torchrun (default: %(default)s)")
    add("--lr", type=float, default=1e-3,
        help="Adam learning rate, the peak of a cosine schedule (default: %(default)s)")
    add("--lr-schedule", default="cosine", choices=["cosine", "constant"],
        help="'cosine' decays the lr to 0 over the run (default: %(default)s)")
    add("--gamma", type=float, default=2.0,
        help="focal loss exponent; 0 gives cross-entropy (default: %(default)s)")
    add("--alpha", type=float, default=0.25, help="focal loss factor (default: %(default)s)")
    add("--jitter", type=float, default=0.05, help="colour augmentation: each band of a training patch "
        "times 1 +- J, plus +- J of its range (4 standard deviations); 0: none (default: %(default)s)")
    add("--cutmix", type=float, default=1.0, help="the share of training patches that get a box of another "
        "patch pasted in, with its labels (CutMix); 0: none (default: %(default)s)")
    add("--class-weights", default="balanced", choices=["balanced", "none"],
        help="'balanced' weighs each class by 1/sqrt of its share of the labels (default: %(default)s)")
    add("--patch", type=int, default=256, help="side of the square training patches, cut at native "
        "resolution; the --points budget is per patch (default: %(default)s)")
    add("--weights", default="imagenet",
        help="encoder init: 'imagenet', 'none' or a torchvision resnet34 .pth (default: %(default)s)")
    add("--seed", type=int, default=0,
        help="seed of the points, the held-out images, the init and the batch order (default: %(default)s)")
    add("--device", default="auto",
        help="'auto' (cuda, else mps, when present), 'cpu', 'cuda', ... (default: %(default)s)")
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"],
        help="'auto' times both on this machine and takes the faster (default: %(default)s)")
    add("--ema", type=float, default=0.0, help="validate and save a moving average of the weights with this "
        "decay at most, e.g. 0.998 (a short run averages about its last ninth of steps); 0: off "
        "(default: %(default)s)")
    add("--out", help="run folder (default: runs/<date>_<time>)")
    add("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    add("--overwrite", action="store_true", help="replace the run already in --out")
    args = p.parse_args(argv)
    ranges = [  # flag, whether its value makes sense, what it must be
        ("epochs", args.epochs >= 1, "1 or more"),
        ("points", args.points >= 0, "0 (dense masks) or more"),
        ("batch_size", args.batch_size >= 1, "1 or more"),
        ("lr", 0 < args.lr < math.inf, "a number more than 0"),
        ("gamma", 0 <= args.gamma < math.inf, "0 (plain cross-entropy) or more"),
        ("alpha", 0 < args.alpha < math.inf, "more than 0 (at 0 the loss is 0: nothing is learned)"),
        ("line_width", 0 < args.line_width < math.inf, "a number of pixels more than 0"),
        ("patch", args.patch >= 32 and args.patch % 32 == 0, "a multiple of 32 (the encoder's stride)"),
        ("ema", 0 <= args.ema < 1, "from 0 (off) to less than 1"),
        ("jitter", 0 <= args.jitter < 1, "from 0 (none) to less than 1"),
        ("cutmix", 0 <= args.cutmix <= 1, "from 0 (none) to 1 (every patch)"),
        ("seed", 0 <= args.seed < 2**32, "from 0 to 2**32 - 1"),
        ("val_images", args.val_images is None or args.val_images >= 0, "0 (no validation) or more"),
    ]
    for name, ok, must in ranges:
        if not ok:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {must}")
    args.bands = band_list(args.bands) if args.bands else None
    args.show_bands = band_list(args.show_bands, "--show-bands", counts=(1, 3)) if args.show_bands else None
    return args


if __name__ == "__main__":
    sys.exit(command_line(main))
