"""Running fast on the machine at hand: the device, the precision (fp32 or bf16, by timing both),
glibc keeping freed memory, the decoder's upsampling folded into its convolutions, batch norm folded
into the convolutions for inference. Each changes how fast the network runs, never what it computes."""
import copy
import ctypes
import os
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from support.cli import DataError


def pick_device(name):
    """'auto' -> cuda when present, else Apple's mps when present, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device (try 'auto', 'cpu', 'cuda', 'cuda:1', 'mps')")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: this machine has no CUDA GPU (torch sees none)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: this machine has no Apple GPU (torch sees no mps)")
    return device


def bf16_possible(device):
    """Whether the hardware may compute bfloat16 natively: a GPU that has it, or a CPU whose flags
    name it (x86 AVX512-BF16 or AMX, Arm's bf16) and whose kernels are not held to AVX2 or less by
    ONEDNN_MAX_CPU_ISA (as when measuring what an AVX2 CPU would do). Where the flags cannot be
    read, try it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False  # mps: float32
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2", "AVX2_VNNI"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return True
    return "bf16" in flags


def time_network(model, device, dtype, train, size, reps=2):
    """Seconds of one forward pass (train=False) or forward + backward (train=True) of the
    network on one size x size patch: the best of `reps`, after one warm-up."""
    bands = model.conv1.in_channels
    x = torch.zeros(1, bands, size, size, device=device).contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
        with torch.set_grad_enabled(train), autocast:
            y = model(x)
        if train:
            y.float().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def pick_dtype(name, device, model, train, size=256):
    """'fp32' or 'bf16' choose. 'auto' measures: where the hardware may compute bfloat16, the
    network is timed in both precisions and the faster is used. A CPU flag alone is not enough:
    some Xeons with AVX512-BF16 but no AMX run bfloat16 slower than float32."""
    if name != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    if not bf16_possible(device):
        return torch.float32
    # a copy: a training-mode forward would move the model's batch-norm statistics
    probe = copy.deepcopy(model).train(train)
    seconds = {dt: time_network(probe, device, dt, train, size) for dt in (torch.float32, torch.bfloat16)}
    best = min(seconds, key=seconds.get)
    what = "a training step" if train else "a forward pass"
    fp32, bf16 = seconds[torch.float32] * 1e3, seconds[torch.bfloat16] * 1e3
    print(f"precision: {what} of a {size}x{size} patch takes {fp32:.0f} ms in float32, {bf16:.0f} ms in "
          f"bfloat16: using {str(best)[6:]}")
    return best


def choose_precision(args, ckpt, device, model, rank, world):
    """The precision the resumed run used, else the flag's, else (auto) the faster on this machine,
    timed by rank 0 for every process."""
    if ckpt is not None and args.precision == "auto" and "precision" in ckpt:
        print(f"precision: {ckpt['precision']}, as the run being resumed chose")
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[ckpt["precision"]]
    dtype = [pick_dtype(args.precision, device, model, train=True, size=args.patch) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(dtype, src=0)
    return dtype[0]


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    By default every freed block over 32 MB goes straight back, so each training step and each
    inference window page-faults its large activations in again, zero-filled by the kernel.
    Measured on a 2-core AMD EPYC, keeping them makes an fp32 training step 16% faster and an
    fp32 forward pass at 1024x1024 40% faster. Linux with glibc only; elsewhere it does nothing.
    train.py calls it, predict.py does not: a scene mapped in blocks of many sizes fragments the kept
    heap, and a 2-gigapixel scene's peak grew from 1.9 GB to 5.4 GB with it.
    -> whether glibc took both settings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        heap = libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap...
        kept = libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ...and up to 2 GiB of free heap is kept
        return heap == kept == 1
    except (OSError, AttributeError):  # no glibc (macOS, Windows, musl)
        return False


def fold_batch_norm(model):
    """For inference: fold every batch norm into the convolution before it, in place.

    In eval mode a batch norm is a fixed per-channel affine map, y = s * (x - mean) + beta with
    s = gamma / sqrt(var + eps), so conv followed by BN is one conv with weights W * s and bias
    (b - mean) * s + beta: the same output, one pass over memory fewer. In this network each
    BatchNorm2d is registered right after its Conv2d (torchvision's ResNet blocks too); a test
    checks that the folded model computes what the original does.
    """
    for parent in model.modules():
        children = list(parent.named_children())
        for (name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight = torch.nn.Parameter(conv.weight * s[:, None, None, None])
                conv.bias = torch.nn.Parameter((bias - bn.running_mean) * s + bn.bias)
                setattr(parent, bn_name, torch.nn.Identity())
    return model


def fold_upsampling(model):
    """For training and inference alike, in place: each decoder block's first convolution takes its input
    at the input's own resolution instead of upsampled 2x by nearest neighbour: 2.25x fewer
    multiplications in that part of the block, the same result up to floating-point rounding.

    A decoder block is a module whose conv1 is a (Conv2d, BatchNorm2d, ReLU) sequence (resnet_unet's
    DecoderBlock; a ResNet block's conv1 is a bare Conv2d). A test checks that the folded network computes
    what the plain one does."""
    for block in model.modules():
        if isinstance(getattr(block, "conv1", None), torch.nn.Sequential):
            block.forward = types.MethodType(upsampled_in_conv, block)
    return model


def upsampled_in_conv(block, x, skip=None, size=None):
    """A DecoderBlock's forward, its upsampling done inside conv1 where it is exactly 2x. conv1 of
    cat([upsampled x, skip]) is conv1's first channels on the upsampled x plus the others on the skip:
    the first part computed at x's own resolution."""
    size = skip.shape[-2:] if skip is not None else size
    if tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):  # odd sizes: as written
        return type(block).forward(block, x, skip, size)
    conv, bn, relu = block.conv1
    n = x.shape[1]
    out = upsample_conv(x, conv.weight[:, :n], conv.bias)
    if skip is not None:
        out = out + F.conv2d(skip, conv.weight[:, n:], padding=1)
    return block.conv2(relu(bn(out)))


def upsample_conv(x, weight, bias=None):
    """A 3x3 convolution (padding 1) of x upsampled 2x by nearest neighbour, without making the
    upsampled x. Along each axis the 3 taps of an upsampled pixel fall on only 2 pixels of x, so the
    whole is a transposed convolution of stride 2 whose 4 taps per axis are sums of the 3:
    [w2, w1+w2, w0+w1, w0]."""
    b = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=weight.dtype, device=weight.device)
    k = torch.einsum("rh,oihw,sw->iors", b, weight, b)  # (in, out, 4, 4): conv_transpose2d's layout
    return F.conv_transpose2d(x, k, bias, stride=2, padding=1)
