"""Speed: training steps, data pipeline, loss and sliding-window inference, each the median of
timed repetitions after a warm-up, next to the machine's measured matrix-multiply peak.

    python bench.py            # about 5 minutes on a 2-core CPU
    python bench.py --quick    # under a minute
"""
import argparse
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
from loss import partial_focal_ce
from model import MEAN, STD, build_model, pick_device, pick_dtype, to_input
from predict import predict_mask


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


def matmul_peak(device, dtype, reps):
    """GFLOP/s of a large square matrix product: the ceiling a convolution network can reach."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, reps) / 1e9


def train_step_fn(model, device, dtype, batch, patch):
    """One optimizer step on a fixed batch with 100 point labels per patch, as train.py does it."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (batch, patch, patch, 3), dtype=torch.uint8, device=device)
    labels = torch.full((batch, patch, patch), data.IGNORE, dtype=torch.uint8, device=device)
    labels.view(batch, -1)[:, torch.randperm(patch * patch)[:100]] = torch.randint(0, 6, (batch, 100), dtype=torch.uint8, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(to_input(images))
        loss = partial_focal_ce(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def flops_per_patch(model, patch):
    """Forward + backward FLOPs of one patch, counted by torch."""
    x = torch.randn(1, 3, patch, patch)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description="Benchmark training, data, loss and inference speed.")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and no fp32-contiguous row: under a minute")
    p.add_argument("--device", default="auto", help="'auto' (cuda when present), 'cpu', 'cuda', ... (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="patches per training step (default: %(default)s)")
    args = p.parse_args()
    device = pick_device(args.device)
    bf16 = pick_dtype("auto", device) == torch.bfloat16
    reps = 3 if args.quick else 10
    batch, patch = args.batch_size, 256
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f", native bf16: {bf16}, batch {batch} of {patch}x{patch}, median of {reps} after 2 warm-ups")  # fmt: skip

    peak = {torch.float32: matmul_peak(device, torch.float32, reps)}
    if bf16:
        peak[torch.bfloat16] = matmul_peak(device, torch.bfloat16, reps)
    print("matmul peak: " + ", ".join(f"{str(k)[6:]} {v:.0f} GFLOP/s" for k, v in peak.items()))

    torch.manual_seed(0)
    flops = flops_per_patch(build_model(6, "none"), patch)
    print(f"ResNet-34 U-Net: {flops / 1e9:.1f} GFLOP per patch, forward + backward")
    configs = [(torch.float32, torch.contiguous_format), (torch.float32, torch.channels_last)][args.quick :]
    configs += [(torch.bfloat16, torch.channels_last)] if bf16 else []
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        smp = None
        print("segmentation_models_pytorch is not installed: no comparison (it is not a dependency)")
    print(f"{'training step':<34}{'ours':>14}{'smp Unet':>14}{'ratio':>7}{'GFLOP/s':>9}{'of peak':>9}")
    for dtype, fmt in configs:
        ours = build_model(6, "none").to(device, memory_format=fmt)
        steps = [train_step_fn(ours, device, dtype, batch, patch)]
        if smp:
            ref = smp.Unet("resnet34", encoder_weights=None, classes=6).to(device, memory_format=fmt)
            steps.append(train_step_fn(ref, device, dtype, batch, patch))
        for s in steps:  # warm-up, then the two interleaved, one step each in turn
            s(), s()
        times = [[], []]
        for _ in range(reps):
            for i, s in enumerate(steps):
                times[i].append(timed(s, device, 1, warmup=0))
        speed = [batch / statistics.median(t) for t in times if t]
        name = f"{str(dtype)[6:]}, {'channels_last' if fmt == torch.channels_last else 'contiguous'}"
        smp_cols = f"{speed[1]:>8.1f} p/s{speed[0] / speed[1]:>7.2f}" if smp else f"{'-':>14}{'-':>7}"
        achieved = speed[0] * flops / 1e9
        print(f"  {name:<32}{speed[0]:>8.1f} p/s{smp_cols}{achieved:>9.0f}{achieved / peak[dtype]:>9.0%}")
    if device.type == "cuda":
        print(f"peak GPU memory of training: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"peak memory of training (this process's RSS so far): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    # the data pipeline alone: patches cut, augmented, batched and normalised, as train.py does
    rng = np.random.default_rng(0)
    scenes = [data.synthetic_scene(rng, 1024, 1024) for _ in range(2)]
    dataset = data.PatchDataset([s[0] for s in scenes], [s[1] for s in scenes], patch)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True)

    def one_pass():
        for images, labels, _ in loader:
            to_input(images.to(device)), labels.to(device)

    print(f"data pipeline alone: {len(dataset) / timed(one_pass, device, reps, warmup=1):.0f} patches/s")

    # the loss on gathered labelled pixels, against the same formula over the whole masked map
    logits = torch.randn(batch, 6, patch, patch, device=device, requires_grad=True)
    labels = torch.full((batch, patch, patch), data.IGNORE, device=device)
    labels.view(batch, -1)[:, torch.randperm(patch * patch)[:100]] = torch.randint(0, 6, (batch, 100), device=device)

    def whole_map():
        p_true = logits.softmax(1).gather(1, labels.clamp(max=5)[:, None])[:, 0]
        m = labels != data.IGNORE
        ((-0.25 * (1 - p_true) ** 2 * p_true.log() * m).sum() / m.sum()).backward()

    gathered = timed(lambda: partial_focal_ce(logits, labels).backward(), device, reps) * 1e3
    print(f"pfCE forward + backward: gathered {gathered:.2f} ms, whole masked map {timed(whole_map, device, reps) * 1e3:.2f} ms")

    # sliding-window inference on an image of the largest size in the data set
    model = build_model(6, "none").to(device, memory_format=torch.channels_last).eval()
    image = np.array(Image.fromarray(scenes[0][0]).resize((2149, 1479)))
    dtype = torch.bfloat16 if bf16 else torch.float32
    seconds = timed(lambda: predict_mask(model, image, MEAN, STD, dtype), device, max(1, reps // 3), warmup=1)
    print(f"sliding window, 2149x1479, {str(dtype)[6:]}: {2149 * 1479 / 1e6 / seconds:.2f} MP/s")


if __name__ == "__main__":
    main()
