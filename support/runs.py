"""Around the training loop: processes under torchrun, the run folder, resuming, where the data is.
Nothing here is the method; train.py calls each piece in one line."""
import errno
import fcntl
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from support import clicks, layout, maps, synthetic
from support.bands import display
from support.cli import DataError, check_writable, written
from support.speed import pick_device

HERE = Path(__file__).parent.parent  # the project folder
KAGGLE = HERE / "data" / "Semantic segmentation dataset"  # where the README says to unzip it
SYNTHETIC = HERE / "data" / "synthetic"
# what a run writes in its folder
OUTPUTS = ["ckpt.pt", "metrics.json", "classes.json", "panel.png", "points.csv", "points.jpg"]
# settings a resumed run must share with the run it continues (the rest may change: epochs, device)
SAME_ON_RESUME = ["data", "point_labels", "class_field", "points_crs", "line_width", "points", "train_tiles",
                  "val_tiles", "val_images", "bands", "batch_size", "lr", "lr_schedule", "gamma", "alpha",
                  "class_weights", "patch", "weights", "seed", "precision", "ema", "aoi", "jitter",
                  "cutmix"]
BEFORE = {"jitter": 0.0, "cutmix": 0.0}  # what the code did before a flag existed, where its default differs


def start_processes(device_name):
    """-> (device, rank, number of processes). Under torchrun: one process per GPU (nccl) or per
    share of the CPU (gloo), and rank 0 alone prints; otherwise one process."""
    device = pick_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), world


@contextmanager
def run_folder(args, world, defaults):
    """with run_folder(...) as (out, ckpt): the run folder, held by this run while the block runs, and the
    checkpoint to resume or None. A folder that holds a run is refused without --resume or --overwrite,
    a folder another train.py is running in is refused, and the folder is tried for writing before long
    work. A setting that a checkpoint lacks (it was written before the flag existed) counts as what that
    older code did: the flag's default, or its value in BEFORE. A folder made here and left empty (an input
    refused later) is removed again."""
    out = Path(args.out or time.strftime("runs/%Y-%m-%d_%H-%M-%S"))
    args.out = str(out)
    made = [p for p in [out, *out.parents] if not p.exists()]  # deepest first
    check_writable(out, "--out", keep=True)
    lock = hold(out) if world == 1 or dist.get_rank() == 0 else None
    try:
        ckpt = resumed(out, args, defaults)
        if world > 1:
            dist.barrier()  # every process has looked at --out before anyone writes there
        yield out, ckpt
    finally:
        if lock is not None:
            release(out, lock)
        for p in made:
            try:
                p.rmdir()  # only where empty
            except OSError:
                break


def resumed(out, args, defaults):
    """The checkpoint of the run in `out` to resume (None if not --resume), its settings checked; a run
    there without --resume or --overwrite is refused."""
    links = [name for name in OUTPUTS if (out / name).is_symlink()]
    if links:
        raise DataError(f"{out / links[0]}: is a link; a run never writes through one (remove it)")
    if not args.resume:
        if ((out / "ckpt.pt").exists() or (out / "points.csv").exists()) and not args.overwrite:
            raise DataError(f"{out}: already holds a run; --resume continues it, --overwrite replaces it")
        return None
    if not (out / "ckpt.pt").exists():
        raise DataError(f"{out}: no finished epoch to resume (no ckpt.pt); start over: --overwrite")
    settings = read_checkpoint(out / "ckpt.pt")["args"]  # mapped: a refused resume reads no weights
    for k in SAME_ON_RESUME:
        was = settings.get(k, BEFORE.get(k, defaults[k]))
        if getattr(args, k) != was:
            flag = "--" + k.replace("_", "-")
            raise DataError(f"--resume: {flag} {getattr(args, k)} differs from the run's {was}")
    return read_checkpoint(out / "ckpt.pt", mmap=False)  # read whole: the next save replaces the file


def hold(out):
    """Take `out` for this process: an exclusive lock on out/train.lock, which holds its pid. The kernel
    lets go of a lock when its process ends, however it ends: a killed run's lock is never in the way.
    -> the lock file's descriptor."""
    path = out / "train.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise DataError(f"{path}: cannot be made ({e.strerror}; a link there is not followed)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataError(f"--out {out}: another train.py (process {pid}) is running there; wait for it "
                            "or choose another --out")
        if path.exists() and path.stat().st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the run that held it removed the file between our open and our lock: again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(out, fd):
    """Let go of the folder: the lock file goes, then the lock."""
    (out / "train.lock").unlink(missing_ok=True)
    os.close(fd)


def write_labels(out, d, labels, points, show):
    """The classes of the run, the points it trains on, and what they look like on a whole image."""
    out.mkdir(parents=True, exist_ok=True)
    layout.write_classes(out / "classes.json", d["classes"], d["colours"])
    if points is not None:
        clicks.write_points(out / "points.csv", points, d["names"])
        picture = display(d["images"][0], d["valid"][0], show)
        with written(out / "points.jpg") as tmp:
            maps.draw_points(picture, labels[0], d["colours"]).save(tmp, quality=90)


def find_data(args, rank, world):
    """The user's --data, else the Kaggle set where the README says to unzip it, else a synthetic
    set (written on first use)."""
    if args.data is not None or KAGGLE.is_dir():
        return args.data or KAGGLE
    if not (SYNTHETIC / "classes.json").exists() and rank == 0:
        synthetic.make_synthetic(SYNTHETIC)
    if world > 1:
        dist.barrier()  # the other processes wait for rank 0 to write it
    print(f"no --data and no '{KAGGLE}': training on the synthetic set in {SYNTHETIC} (see README)")
    return SYNTHETIC


def resume_state(ckpt, meta, model, optimizer, out, ema=None):
    """-> (history, first epoch): the checkpoint's when resuming, else a fresh start. The classes (names
    and order) and the bands must be those of the run resumed. With a moving average of the weights, the
    checkpoint's "model" is the average and "trained" the weights."""
    if ckpt is None:
        return [], 0
    for key, what in [("classes", "classes"), ("bands", "bands")]:
        if list(ckpt[key]) != list(meta[key]):
            was, now = ", ".join(map(str, ckpt[key])), ", ".join(map(str, meta[key]))
            raise DataError(f"--resume: the {what} are now {now}; the run's were {was}")
    if ema is None:
        model.load_state_dict(ckpt["model"])
    else:
        ema.load_state_dict(ckpt["model"])
        model.load_state_dict(ckpt["trained"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resuming {out} after epoch {ckpt['epoch']}")
    return ckpt["history"], ckpt["epoch"]


def save_run(out, model, optimizer, meta, history, args, ema=None):
    """The checkpoint and metrics.json, each written whole or not at all. "model" holds the weights
    predict.py maps with: the moving average where there is one."""
    shown = model if ema is None else ema
    state = {"model": shown.state_dict(), "optimizer": optimizer.state_dict(), "epoch": history[-1]["epoch"]}
    if ema is not None:
        state["trained"] = model.state_dict()
    try:
        save_checkpoint(out / "ckpt.pt", {**meta, **state, "history": history, "args": vars(args)})
        with written(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps({"history": history}, indent=1))
    except DataError as e:  # a full disk
        raise DataError(f"{e}: epoch {history[-1]['epoch']} is not saved; the last whole checkpoint: "
                        f"{last_checkpoint(out, history[:-1])}")


def last_checkpoint(out, history):
    if not history:
        return "none (no epoch finished)"
    return f"{out / 'ckpt.pt'} (after epoch {history[-1]['epoch']})"


def save_checkpoint(path, ckpt):
    """Written whole or not at all (cli.written): a kill leaves the old checkpoint or the new one."""
    crc = torch.serialization.get_crc32_options()
    # no CRC-32 of every record: torch.load never checks it, and it took three quarters of the save
    torch.serialization.set_crc32_options(False)
    try:
        with written(path) as tmp:
            try:
                torch.save(ckpt, tmp)
            except RuntimeError:  # a full disk: torch.save says so as a RuntimeError
                raise OSError(errno.EIO, "write failed")
    finally:
        torch.serialization.set_crc32_options(crc)


def read_checkpoint(path, mmap=True):
    """-> the checkpoint's dict, its tensors on the CPU (mapped from the file with mmap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint")
    except Exception as e:
        raise DataError(f"{path}: not a checkpoint of this project ({e.__class__.__name__})")
    if not isinstance(ckpt, dict) or not {"model", "classes", "args"} <= ckpt.keys():
        raise DataError(f"{path}: not a checkpoint of this project (no model, classes or args)")
    for key, (right, what) in FIELDS.items():
        if key in ckpt and not right(ckpt[key]):
            value = str(ckpt[key])[:40]
            raise DataError(f"{path}: not a checkpoint of this project (its {key} is {value!r}, not {what})")
    if "colours" in ckpt and len(ckpt["colours"]) != len(ckpt["classes"]):
        raise DataError(f"{path}: not a checkpoint of this project ({len(ckpt['classes'])} classes, "
                        f"{len(ckpt['colours'])} colours)")
    return ckpt


def numbers(v, kind=(int, float)):
    return isinstance(v, (list, tuple)) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


# what each field of a checkpoint must be: a file edited by hand, or another program's, is one line
FIELDS = {
    "classes": (lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v), "names"),
    "colours": (lambda v: isinstance(v, list) and all(numbers(c, int) and len(c) == 3 for c in v),
                "a list of [red, green, blue]"),
    "args": (lambda v: isinstance(v, dict), "a dict of settings"),
    "model": (lambda v: isinstance(v, dict), "a state_dict"),
    "bands": (lambda v: numbers(v, int) and v, "a list of band numbers"),
    "show_bands": (lambda v: v is None or numbers(v, int), "a list of band numbers"),
    "norm": (lambda v: v == "imagenet" or isinstance(v, dict) and numbers(v.get("mean")) and
             numbers(v.get("std")), "'imagenet' or {mean, std}"),
    "patch": (lambda v: isinstance(v, int), "a number of pixels"),
    "precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
}


class NonFiniteLoss(Exception):
    """A loss that is no number: where, and the indices of the images its batch came from."""

    def __init__(self, where, images):
        super().__init__(where)
        self.images = images


def finite_losses(pending, dataset, epoch):
    """[(step, loss tensor, patch indices)] -> the losses as numbers; a non-finite one stops the run."""
    values = torch.stack([loss for _, loss, _ in pending]).tolist()  # one sync for them all
    for (step, _, index), v in zip(pending, values):
        if not math.isfinite(v):
            images = sorted({dataset.items[i][0] for i in index.tolist()})
            raise NonFiniteLoss(f"epoch {epoch + 1} step {step}: loss is {v}", images)
    return values
