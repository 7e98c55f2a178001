"""Speed on this machine, named in the first line: the precision train.py and predict.py choose
against the faster one, training against the reference recipe, predict.py end to end against a
bare fp32 forward pass, the data pipeline and the loss, next to the machine's measured peak.

    python -m tools.bench            # about 3 minutes on a 2-core CPU
    python -m tools.bench --quick    # about a minute
"""
import argparse
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import sigmoid_focal_loss

import data
import predict
from loss import partial_focal_ce
from model import build_model
from support.bands import to_input
from support.cli import DataError, command_line
from support.maps import map_scene
from support.speed import bf16_possible, fold_batch_norm, fold_upsampling, keep_freed_memory, pick_device
from support.speed import pick_dtype
from support.synthetic import synthetic_scene

FP32, BF16 = torch.float32, torch.bfloat16


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, device, reps, warmup=2):
    """Median seconds of fn() over reps calls, after warmup calls."""
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak(device, dtype, reps):
    """GFLOP/s of the faster of a large matrix product and a large 3x3 convolution (on a CPU the
    two can go through different libraries: MKL runs AMD CPUs on a slower code path than oneDNN)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n**3 / timed(lambda: a @ b, device, reps)
    x = torch.randn(8, 256, 32, 32, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = 2 * 8 * 256 * 256 * 9 * 32 * 32 / timed(lambda: F.conv2d(x, w, padding=1), device, reps)
    return max(matmul, conv) / 1e9


def smp_focal_loss(logits, labels):
    """segmentation_models_pytorch's FocalLoss("multiclass", ignore_index=255): one-vs-rest sigmoid
    focal loss (gamma 2, no alpha) on the labelled pixels, summed over classes."""
    keep = labels != data.IGNORE
    picked = logits.permute(0, 2, 3, 1)[keep].float()  # (N, C)
    target = F.one_hot(labels[keep].long(), picked.shape[1]).float()
    return sigmoid_focal_loss(picked, target, alpha=-1, gamma=2, reduction="sum") / max(len(picked), 1)


def train_step_fn(model, loss_fn, device, dtype, batch, patch, reference=False, bands=3):
    """One optimizer step on a fixed batch with 100 point labels per patch, as train.py does it
    (channels_last memory, fused Adam) or, with `reference`, as the reference recipe does (NCHW, Adam's
    default). More than 3 bands come as 16-bit samples with the data set's per-band scale, as a
    multispectral scene does."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=not reference)
    shape = (batch, patch, patch, bands)
    if bands == 3:  # an 8-bit photo
        images, norm = torch.randint(0, 256, shape, dtype=torch.uint8, device=device), "imagenet"
    else:  # 16-bit samples, normalised by the data set's per-band mean and std
        images = torch.randint(0, 10000, shape, dtype=torch.int32, device=device)
        norm = {"mean": [5000.0] * bands, "std": [2900.0] * bands}
    labels = torch.full((batch, patch, patch), data.IGNORE, dtype=torch.uint8, device=device)
    points = torch.randint(0, 6, (batch, 100), dtype=torch.uint8, device=device)
    labels.view(batch, -1)[:, torch.randperm(patch * patch)[:100]] = points

    def step():
        x = to_input(images, norm).contiguous() if reference else to_input(images, norm)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != FP32):
            logits = model(x)
        loss = loss_fn(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def flops_per_patch(model, patch, bands=3):
    """Forward + backward FLOPs of one patch, counted by torch."""
    x = torch.randn(1, bands, patch, patch)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training, inference, data and loss speed.")
    p.add_argument("--quick", action="store_true", help="3 repetitions instead of 10: about a minute")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda, then mps, when present), 'cpu', 'cuda', ... (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="patches per training step (default: %(default)s)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be 1 or more")
    device = pick_device(args.device)
    reps = 3 if args.quick else 10
    batch, patch, dtypes = args.batch_size, 256, [FP32] + ([BF16] if bf16_possible(device) else [])
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"{machine_name(device)} ({threads}), torch {torch.__version__}, batch {batch} of {patch}x{patch}, "
          f"median of {reps} after 2 warm-ups")
    peaks = {dt: peak(device, dt, reps) for dt in dtypes}
    print("peak: " + ", ".join(f"{str(k)[6:]} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    torch.manual_seed(0)
    flops = flops_per_patch(fold_upsampling(build_model(6, "none")), patch)

    # the reference recipe as a plain script runs it: smp's Unet and FocalLoss (ours, the same
    # architecture, with that loss, if smp is not installed), fp32, contiguous, malloc defaults
    try:
        import segmentation_models_pytorch as smp

        ref_model, ref_name = smp.Unet("resnet34", encoder_weights=None, classes=6), "smp Unet + FocalLoss"
    except ImportError:
        # the U-Net as written: its decoder makes the upsampled input and concatenates it, as smp's does
        ref_model, ref_name = build_model(6, "none"), "this U-Net + smp's focal loss (no smp here)"
    flops_of = {"reference": flops_per_patch(ref_model, patch)}
    print(f"ResNet-34 U-Net: {flops / 1e9:.1f} GFLOP per patch, forward + backward; the reference "
          f"{flops_of['reference'] / 1e9:.1f} (its decoder convolves the upsampled input)")
    ref_model = ref_model.to(device)
    reference = train_step_fn(ref_model, smp_focal_loss, device, FP32, batch, patch, reference=True)
    rows = {"reference": timed(reference, device, reps)}
    model = fold_upsampling(build_model(6, "none")).to(device, memory_format=torch.channels_last)
    ours = {dt: train_step_fn(model, partial_focal_ce, device, dt, batch, patch) for dt in dtypes}
    rows["malloc defaults"] = timed(ours[FP32], device, reps)
    keep_freed_memory()  # what train.py does first (predict.py does not; its line below runs with it kept)
    for dt in dtypes:
        rows[dt] = timed(ours[dt], device, reps)
    for n in (4, 13):  # a first convolution of N bands: the rest of the network is the same
        bands = fold_upsampling(build_model(6, "none", in_channels=n))
        bands = bands.to(device, memory_format=torch.channels_last)
        step = train_step_fn(bands, partial_focal_ce, device, FP32, batch, patch, bands=n)
        rows[n] = timed(step, device, reps)
        flops_of[n] = flops_per_patch(fold_upsampling(build_model(6, "none", in_channels=n)), patch, n)
    names = {
        "reference": f"reference: {ref_name}, fp32, contiguous",
        "malloc defaults": "ours, fp32, channels_last, glibc malloc defaults",
        FP32: "ours, fp32, channels_last",
        BF16: "ours, bf16, channels_last",
        4: "ours, fp32, channels_last, 4 bands (16-bit)",
        13: "ours, fp32, channels_last, 13 bands (16-bit)",
    }
    print(f"{'training step':<58}{'patches/s':>10}{'GFLOP/s':>9}{'of peak':>9}{'x ref':>7}")
    for k, seconds in rows.items():
        dt = k if k in peaks else FP32
        speed = batch / seconds
        gflops, ratio = speed * flops_of.get(k, flops) / 1e9, rows["reference"] / seconds
        print(f"  {names[k]:<56}{speed:>10.2f}{gflops:>9.0f}{gflops / peaks[dt]:>9.0%}{ratio:>7.2f}")
    chosen = pick_dtype("auto", device, model, train=True)
    fastest = min(rows[dt] for dt in dtypes)
    print(f"train.py's choice, {str(chosen)[6:]}: {fastest / rows[chosen]:.0%} of the faster precision's "
          f"speed, {rows['reference'] / rows[chosen]:.2f}x the reference")
    if device.type == "cuda":
        print(f"peak GPU memory of training: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")

    # predict.py end to end on a 2149x1479 JPEG (decode, windows, mask and overlay written) against
    # one bare fp32 forward pass of the unfolded network over the whole image
    model.eval()
    rng = np.random.default_rng(0)
    scenes = [synthetic_scene(rng, 1024, 1024) for _ in range(2)]
    tmp = Path(f"bench_{time.time_ns()}")
    tmp.mkdir()
    path = tmp / "scene.jpg"
    Image.fromarray(scenes[0][0]).resize((2149, 1479)).save(path, quality=90)
    mp = 2149 * 1479 / 1e6
    whole = to_input(torch.from_numpy(np.zeros((1, 1504, 2176, 3), np.uint8)).to(device))  # padded to 32
    with torch.no_grad():
        bare = mp / timed(lambda: model(whole), device, max(1, reps // 3), warmup=1)
    folded = fold_upsampling(fold_batch_norm(build_model(6, "none").eval()))
    folded = folded.to(device, memory_format=torch.channels_last)

    meta = {"classes": list("abcdef"), "colours": [(40 * i, 40 * i, 40 * i) for i in range(6)]}

    def mapped(dt):
        return map_scene(partial(predict.sliding_window, folded, dtype=dt), meta, path, tmp / "scene")

    speeds = {dt: mp / timed(lambda: mapped(dt), device, max(1, reps // 3), warmup=1) for dt in dtypes}
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(f"bare fp32 forward pass of the whole 2149x1479 image: {bare:.2f} MP/s")
    for dt, speed in speeds.items():
        print(f"predict.py per image, {str(dt)[6:]}, batch norm folded: {speed:.2f} MP/s, "
              f"{speed / bare:.2f}x bare fp32")
    chosen = pick_dtype("auto", device, folded, train=False)
    share = speeds[chosen] / max(speeds.values())
    print(f"predict.py's choice, {str(chosen)[6:]}: {share:.0%} of the faster precision's speed, "
          f"{speeds[chosen] / bare:.2f}x the bare fp32 forward pass")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import predict"], cwd=Path(__file__).parent.parent, check=True)
    print(f"predict.py start-up: imports {time.perf_counter() - t0:.1f} s (in a fresh process)")

    # the data pipeline alone: patches cut, augmented, batched and normalised, as train.py does
    dataset = data.PatchDataset([s[0] for s in scenes], [s[1] for s in scenes], patch)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True)

    def one_pass():
        for images, labels, _ in loader:
            to_input(images.to(device)), labels.to(device)

    print(f"data pipeline alone: {len(dataset) / timed(one_pass, device, reps, warmup=1):.0f} patches/s")

    # the loss on gathered labelled pixels, against the same formula over the whole masked map
    logits = torch.randn(batch, 6, patch, patch, device=device, requires_grad=True)
    labels = torch.full((batch, patch, patch), data.IGNORE, device=device)
    points = torch.randint(0, 6, (batch, 100), device=device)
    labels.view(batch, -1)[:, torch.randperm(patch * patch)[:100]] = points

    def whole_map():
        p_true = logits.softmax(1).gather(1, labels.clamp(max=5)[:, None])[:, 0]
        m = labels != data.IGNORE
        ((-0.25 * (1 - p_true) ** 2 * p_true.log() * m).sum() / m.sum()).backward()

    gathered = timed(lambda: partial_focal_ce(logits, labels).backward(), device, reps) * 1e3
    whole = timed(whole_map, device, reps) * 1e3
    print(f"pfCE forward + backward: gathered {gathered:.2f} ms, whole masked map {whole:.2f} ms")


if __name__ == "__main__":
    sys.exit(command_line(main))
