"""Around the training loop: processes under torchrun, the run folder, resuming, where the data is.
Nothing here is the method; train.py calls each piece in one line."""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from support import synthetic
from support.cli import DataError, check_writable
from support.speed import pick_device

HERE = Path(__file__).parent.parent  # the project folder
KAGGLE = HERE / "data" / "Semantic segmentation dataset"  # where the README says to unzip it
SYNTHETIC = HERE / "data" / "synthetic"
# settings a resumed run must share with the run it continues (the rest may change: epochs, device)
SAME_ON_RESUME = ["data", "point_labels", "class_field", "points_crs", "line_width", "points", "train_tiles",
                  "val_tiles", "val_images", "bands", "batch_size", "lr", "lr_schedule", "gamma", "alpha",
                  "class_weights", "patch", "weights", "seed", "precision", "ema"]


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


def open_run_folder(args, world, defaults):
    """-> (run folder, the checkpoint to resume or None). A folder that holds a run is refused
    without --resume or --overwrite; the folder is made and tried for writing before long work.
    A setting that a checkpoint lacks (it was written before the flag existed) counts as the flag's
    default, which does what that older code did."""
    out = Path(args.out or time.strftime("runs/%Y-%m-%d_%H-%M-%S"))
    args.out = str(out)
    ckpt = None
    if args.resume:
        if not (out / "ckpt.pt").exists():
            raise DataError(f"{out}: no finished epoch to resume (no ckpt.pt); start over: --overwrite")
        settings = read_checkpoint(out / "ckpt.pt")["args"]  # mapped: a refused resume reads no weights
        for k in SAME_ON_RESUME:
            was = settings.get(k, defaults[k])
            if getattr(args, k) != was:
                flag = "--" + k.replace("_", "-")
                raise DataError(f"--resume: {flag} {getattr(args, k)} differs from the run's {was}")
        ckpt = read_checkpoint(out / "ckpt.pt", mmap=False)  # read whole: the next save replaces the file
    elif ((out / "ckpt.pt").exists() or (out / "points.csv").exists()) and not args.overwrite:
        raise DataError(f"{out}: already holds a run; --resume continues it, --overwrite replaces it")
    check_writable(out, "--out", keep=world > 1)
    if world > 1:
        dist.barrier()  # every process has looked at --out before anyone writes there
    return out, ckpt


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


def resume_state(ckpt, model, optimizer, out, ema=None):
    """-> (history, first epoch): the checkpoint's when resuming, else a fresh start. With a moving
    average of the weights, the checkpoint's "model" is the average and "trained" the weights."""
    if ckpt is None:
        return [], 0
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
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps({"history": history}, indent=1))
        tmp.replace(out / "metrics.json")
    except (OSError, RuntimeError) as e:  # a full disk: torch.save says so as a RuntimeError
        (out / "metrics.json.tmp").unlink(missing_ok=True)
        free = shutil.disk_usage(out).free / 1e6
        why = getattr(e, "strerror", None) or "write failed"
        raise DataError(f"{out}: cannot write the checkpoint of epoch {history[-1]['epoch']} ({why}; "
                        f"{free:.0f} MB free on its disk); the last whole checkpoint: "
                        f"{last_checkpoint(out, history[:-1])}")


def last_checkpoint(out, history):
    if not history:
        return "none (no epoch finished)"
    return f"{out / 'ckpt.pt'} (after epoch {history[-1]['epoch']})"


def save_checkpoint(path, ckpt):
    """Write to a temporary file, then rename: a kill leaves the old checkpoint or the new one,
    never a torn file."""
    tmp = Path(str(path) + ".tmp")
    crc = torch.serialization.get_crc32_options()
    # no CRC-32 of every record: torch.load never checks it, and it took three quarters of the save
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written file is left on it
        tmp.unlink(missing_ok=True)
        raise
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
    return ckpt
