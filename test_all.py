"""Tests: each computes something two ways, or checks a property that must hold. `pytest test_all.py`

Fast (no network, tiny data written here); set AERIAL_DATA to a data set to add a real-data run.
"""
import contextlib
import copy
import csv
import errno
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, TiffImagePlugin

import assess
import clicks
import data
import georef
import label
import label_guard
import layout
import maps
import model
import predict
import scene
import shapes
import simulate
import speed
import synthetic
import train
from cli import DataError, band_list, command_line
from loss import partial_focal_ce
from model import build_model, load_checkpoint, read_checkpoint, save_checkpoint, to_input
from speed import fold_batch_norm, keep_freed_memory, pick_device, pick_dtype
from resnet_unet import DecoderBlock, ResNetUNet, upsample_conv

HERE = Path(__file__).parent
# the tests must not depend on how pytest was started: torchrun's variables, if pytest runs under
# it, would make every train.main() here wait for process-group peers
for name in ["WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
    os.environ.pop(name, None)
COLOURS = [(226, 169, 41), (132, 41, 246), (110, 193, 228)]  # a 3-class palette for handmade data sets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A synthetic data set small enough to train on in a second: 3 tiles of 2 images, 96x96."""
    return synthetic.make_synthetic(tmp_path_factory.mktemp("tiny") / "set", tiles=3, per_tile=2, size=96)


@pytest.fixture(scope="session")
def mini(tmp_path_factory):
    """Smaller still, for tests that train several runs: 2 tiles of one 64x64 image (--patch 32)."""
    return synthetic.make_synthetic(tmp_path_factory.mktemp("mini") / "set", tiles=2, per_tile=1, size=64)


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory):
    """One epoch trained on the tiny set -> (the model train.main returned, its run folder)."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    return train.main(tiny_args(tiny, run)), run


def tiny_args(root, out, *extra):
    return ["--data", str(root), "--out", str(out), "--patch", "64", "--weights", "none", "--epochs", "1",
            "--precision", "fp32", "--device", "cpu", *extra]


def start_script(script, *args):
    """The script started in a process of its own, stdout and stderr piped: tests start several at once,
    each paying the seconds of importing torch while the others do."""
    command = [sys.executable, str(HERE / script), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_set(root, classes, images):
    """A handmade data set: classes.json text, and {relative image path: (image, mask or None)}."""
    root.mkdir(parents=True)
    (root / "classes.json").write_text(classes)
    for rel, (image, mask) in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
        if mask is not None:
            (root / layout.mask_path(Path(rel))).parent.mkdir(parents=True, exist_ok=True)
            mask.save(root / layout.mask_path(Path(rel)))
    return root


def tile_masks(root, tiles, colours):
    """-> (names, images, masks) of the given tiles of a data set in the Kaggle layout."""
    files = layout.tile_files(root, tiles)
    images, _, masks = layout.read_images(files, colours)
    return [n for n, _ in files], images, masks


def classes_json(colours=COLOURS):
    classes = [{"title": f"c{i}", "color": "#%02X%02X%02X" % c} for i, c in enumerate(colours)]
    return json.dumps({"classes": classes})


# ---------------------------------------------------------------------------- the network


def test_shapes_for_odd_sizes_and_parameter_count():
    model = ResNetUNet(6).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (33, 47), (65, 100)]:
            assert model(torch.randn(2, 3, h, w)).shape == (2, 6, h, w)
    # the same count as segmentation_models_pytorch's Unet("resnet34", classes=6)
    assert sum(p.numel() for p in model.parameters()) == 24_437_094


def test_the_upsampling_inside_the_convolution_is_upsample_then_convolve():
    torch.manual_seed(0)
    shapes = [(2, 5, 7, 9), (4, 5, 3, 3), (4,)]
    x, weight, bias = (torch.randn(*shape, dtype=torch.double) for shape in shapes)
    plain = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    assert torch.allclose(upsample_conv(x, weight, bias), plain, atol=1e-12)
    # the whole network, both ways: the same outputs and the same gradients (odd sizes take the plain way)
    nets = [ResNetUNet(6).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for block in (m for m in nets[1].modules() if isinstance(m, DecoderBlock)):
        block.upsample_in_conv = False
    for h, w in [(64, 96), (65, 100)]:
        image = torch.randn(2, 3, h, w, dtype=torch.double)
        outs = [net(image) for net in nets]
        assert torch.allclose(outs[0], outs[1], atol=1e-10)
        for out in outs:
            out.square().mean().backward()
        for p, q in zip(*(net.parameters() for net in nets)):
            assert torch.allclose(p.grad, q.grad, atol=1e-10)
            p.grad = q.grad = None


def test_weights_from_a_path_and_from_the_torch_hub_cache(tmp_path, monkeypatch, capsys):
    import torchvision
    from torchvision.models import ResNet34_Weights

    reference = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(reference, tmp_path / "r34.pth")
    model = build_model(6, str(tmp_path / "r34.pth"))
    for k in ["conv1.weight", "layer4.2.bn2.running_var", "layer2.0.downsample.0.weight"]:
        assert torch.equal(model.state_dict()[k], reference[k])
    # the ImageNet path reads torchvision's cache first: a file there loads without network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / Path(ResNet34_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    assert torch.equal(build_model(6, "imagenet").layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    # no file and no network: one warning naming the file and where it goes, then random init
    cached.unlink()

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    build_model(6, "imagenet")
    warning = capsys.readouterr().out
    assert warning.count("\n") == 1 and "resnet34-b627a593.pth" in warning and str(cached.parent) in warning
    with pytest.raises(DataError, match="no such file"):
        build_model(6, str(tmp_path / "missing.pth"))
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="not a torchvision resnet34"):
        build_model(6, str(tmp_path / "other.pth"))


def test_folding_batch_norm_changes_no_output():
    torch.manual_seed(0)
    net = ResNetUNet(4)
    with torch.no_grad():  # batch norm statistics and affine weights other than 0 and 1
        net(torch.randn(4, 3, 64, 64))
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    net.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = net(x)
        folded = fold_batch_norm(copy.deepcopy(net))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(x), expected, rtol=1e-4, atol=1e-4)


def test_precision_is_the_faster_of_the_two_timings(monkeypatch, capsys):
    net, cpu = ResNetUNet(3), torch.device("cpu")
    timings = {}
    monkeypatch.setattr(speed, "time_network", lambda m, device, dtype, train, size: timings[dtype])
    monkeypatch.setattr(speed, "bf16_possible", lambda device: True)
    for fp32, bf16, expected in [(0.2, 0.1, torch.bfloat16), (0.1, 0.2, torch.float32)]:
        timings = {torch.float32: fp32, torch.bfloat16: bf16}
        assert pick_dtype("auto", cpu, net, train=True) == expected
        said = capsys.readouterr().out
        assert said.count("\n") == 1
        assert f"{fp32 * 1e3:.0f} ms in float32, {bf16 * 1e3:.0f} ms in bfloat16" in said
    timings = {}  # a forced precision, or hardware without bfloat16: nothing is timed
    assert pick_dtype("bf16", cpu, net, train=True) == torch.bfloat16
    assert pick_dtype("fp32", cpu, net, train=True) == torch.float32
    monkeypatch.setattr(speed, "bf16_possible", lambda device: False)
    assert pick_dtype("auto", cpu, net, train=False) == torch.float32 and capsys.readouterr().out == ""


def test_kernels_held_to_avx2_rule_out_bf16(monkeypatch):
    monkeypatch.setattr(speed.Path, "read_text", lambda self: "flags : fpu avx2 avx512_bf16")
    cpu = torch.device("cpu")
    for isa, possible in [(None, True), ("avx2", False), ("AVX512_CORE_AMX", True)]:
        if isa:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        else:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        assert speed.bf16_possible(cpu) == possible


def test_precision_timing_for_real_leaves_the_model_as_it_was(monkeypatch, capsys):
    monkeypatch.setattr(speed, "bf16_possible", lambda device: True)  # time both even where bf16 is slow
    net = ResNetUNet(3).train()
    before = copy.deepcopy(net.state_dict())
    chosen = pick_dtype("auto", torch.device("cpu"), net, train=True, size=64)
    fp32, bf16 = map(int, re.findall(r"(\d+) ms in", capsys.readouterr().out))
    assert fp32 == bf16 or chosen == (torch.bfloat16 if bf16 < fp32 else torch.float32)  # as timed
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_device_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(DataError, match="no Apple GPU"):
        pick_device("mps")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/maps").exists(),
                    reason="a setting of glibc's malloc, seen in Linux's memory maps")
def test_freed_memory_is_kept_for_reuse():
    def heap():  # (start, end) of the heap that malloc grows with brk
        line = next(s for s in Path("/proc/self/maps").read_text().splitlines() if s.endswith("[heap]"))
        return [int(a, 16) for a in line.split()[0].split("-")]

    if not keep_freed_memory():
        pytest.skip("this glibc refused the mallopt settings (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)")
    block = torch.ones(16 * 2**20)  # 64 MB: by default a mapping of its own, handed back when freed
    start, end = heap()
    assert start <= block.data_ptr() < end  # from the heap instead,
    del block
    assert heap()[1] >= end  # and the heap keeps it when it is freed


def test_the_decoder_takes_each_skip_at_its_own_scale():
    """The forward against the U-Net written out again here: encoder stages, then each decoder stage
    upsampled to its skip (1/16, 1/8, 1/4, 1/2) and concatenated with it, then full resolution."""
    torch.manual_seed(0)
    net = ResNetUNet(3).eval()
    for block in (m for m in net.modules() if isinstance(m, DecoderBlock)):
        block.upsample_in_conv = False  # as written here; the test above ties the default way to this one
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        f1 = net.relu(net.bn1(net.conv1(x)))
        f2 = net.layer1(net.maxpool(f1))
        f3 = net.layer2(f2)
        f4 = net.layer3(f3)
        y = net.layer4(f4)
        for block, skip in [(net.up1, f4), (net.up2, f3), (net.up3, f2), (net.up4, f1)]:
            y = torch.cat([F.interpolate(y, size=skip.shape[-2:], mode="nearest"), skip], 1)
            y = block.conv2(block.conv1(y))
        y = net.up5.conv2(net.up5.conv1(F.interpolate(y, size=(64, 96), mode="nearest")))
        assert [f.shape[-1] for f in (f1, f2, f3, f4)] == [48, 24, 12, 6]
        assert torch.equal(net(x), net.head(y))


# ---------------------------------------------------------------------------- the loss


def pfce_reference(logits, target, gamma, alpha):
    """The report's formula over the whole map: sum(FL * M) / sum(M)."""
    p = logits.softmax(1)
    m = target != 255
    pt = torch.gather(p, 1, torch.where(m, target, 0)[:, None])[:, 0]
    fl = -alpha * (1 - pt) ** gamma * torch.log(pt)
    return (fl * m).sum() / m.sum()


def test_pfce_matches_the_formula_and_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17, 19, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 17, 19))
    target[torch.rand(target.shape) < 0.9] = 255
    for gamma, alpha in [(2.0, 0.25), (0.5, 1.0), (0.0, 0.3)]:
        ours = partial_focal_ce(logits, target, gamma=gamma, alpha=alpha)
        assert torch.allclose(ours, pfce_reference(logits, target, gamma, alpha).float(), rtol=1e-5)
    # gamma 0, alpha 1 is plain cross-entropy over the labelled pixels
    ce = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(partial_focal_ce(logits, target, gamma=0, alpha=1), ce.float(), rtol=1e-5)
    # class weights: weighting class 2 by 3 adds twice its pixels' share to the loss
    w = torch.tensor([1.0, 1, 3, 1, 1])
    only2 = torch.where(target == 2, target, 255)
    n2, n = (only2 != 255).sum(), (target != 255).sum()
    expected = partial_focal_ce(logits, target) + 2 * partial_focal_ce(logits, only2) * n2 / n
    assert torch.allclose(partial_focal_ce(logits, target, class_weights=w), expected, rtol=1e-5)


def test_pfce_gradient_only_on_labelled_pixels_and_empty_batch():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), 255)
    target[0, 1, 2], target[1, 5, 7] = 3, 0
    partial_focal_ce(logits, target).backward()
    touched = logits.grad.abs().sum(1) > 0
    assert touched.sum() == 2 and touched[0, 1, 2] and touched[1, 5, 7]
    logits.grad = None
    empty = partial_focal_ce(logits, torch.full((2, 8, 8), 255))
    assert empty.item() == 0 and empty.requires_grad
    empty.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_balanced_class_weights():
    labels = [np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 255, 255]], np.uint8)]  # shares 0.8, 0.2, 0
    w = train.balanced_weights(labels, 3)
    assert w[0] / w[1] == pytest.approx(0.5) and w[2] == 0  # 1/sqrt(0.8) : 1/sqrt(0.2)
    assert 0.8 * w[0] + 0.2 * w[1] == pytest.approx(1)  # the average labelled pixel weighs 1


def test_lr_schedule_is_a_half_cosine_and_batch_norm_averages_all_batches_then_one_epoch():
    total = 400
    for step in [0, 50, 100, 200, 300, 399]:  # a linear decay agrees with the cosine at 200 only
        half_cosine = 1e-3 * (1 + math.cos(math.pi * step / total)) / 2
        assert train.get_lr(step, total, 1e-3, "cosine") == pytest.approx(half_cosine)
        assert train.get_lr(step, total, 1e-3, "constant") == 1e-3
    assert train.get_lr(100, total, 1e-3, "cosine") == pytest.approx(0.853553e-3, rel=1e-5)  # not 0.75e-3
    # momentum 1/(n+1) at step n is the plain mean of all batches so far; from 1/steps on, a moving average
    mean, values = torch.zeros(1), [4.0, 1.0, 7.0]
    for n, v in enumerate(values):
        m = train.batch_norm_momentum(n, steps_per_epoch=50)
        mean = (1 - m) * mean + m * v
    assert mean.item() == pytest.approx(sum(values) / 3)
    assert train.batch_norm_momentum(10_000, 50) == 1 / 50  # the last epoch,
    assert train.batch_norm_momentum(10_000, 500) == 1 / 100  # or the last 100 batches


def test_moving_average_of_the_weights_is_the_weighted_sum_of_every_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema, decay = copy.deepcopy(model), 0.8
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(1, 6):  # new weights and batch-norm statistics, as after an optimizer step
        for k, v in model.state_dict().items():
            v.copy_(torch.randn_like(v.float()) if v.is_floating_point() else torch.tensor(step))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        train.update_ema(ema, model, decay)
    n = len(states) - 1  # the closed form: decay^n of the start, (1 - decay) decay^(n - k) of step k
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            steps = sum((1 - decay) * decay ** (n - i) * states[i][k] for i in range(1, n + 1))
            want = decay**n * states[0][k] + steps
            assert torch.allclose(v, want, atol=1e-6), k
        else:
            assert v == n, k  # batches seen: counted, not averaged


# ---------------------------------------------------------------------------- data


def test_point_sampler():
    rng = np.random.default_rng(1)
    masks = [rng.integers(0, 3, (100, 130)).astype(np.uint8) for _ in range(2)]
    masks[0][:, :40] = data.IGNORE  # no class here: never a point
    points, short = data.sample_points(masks, 64, 50, seed=7)
    n_patches = len(data.grid(100, 64)) * len(data.grid(130, 64))  # 2 x 3
    assert len(points) == 2 * n_patches * 50
    assert len(set((i, x, y) for i, x, y, c in points)) == len(points)  # without replacement
    assert all(masks[i][y, x] == c != data.IGNORE for i, x, y, c in points)
    assert short == 0
    assert data.sample_points(masks, 64, 50, seed=7)[0] == points
    assert data.sample_points(masks, 64, 50, seed=8)[0] != points
    # asking for more points than a patch has labelled pixels takes them all, and counts the patch
    few, short = data.sample_points([masks[0][:64, :64]], 64, 4000, seed=0)
    assert len(few) == 24 * 64 and short == 1


def test_reader_palette_masks_unknown_colours_and_missing_masks(tmp_path, capsys):
    truth = np.array([[0, 1, 2, 1], [2, 2, 0, 9]], np.uint8)  # 9: black, in no class
    pal = Image.fromarray(truth, mode="P")
    pal.putpalette([v for c in COLOURS for v in c] + [0] * 3 * 6 + [0, 0, 0])
    rgb = np.array(COLOURS + [(0, 0, 0)] * 7, np.uint8)[truth]
    image = np.zeros((2, 4, 3), np.uint8)
    files = {"Tile 1/images/a.jpg": (image, pal), "Tile 2/images/b.png": (image, Image.fromarray(rgb))}
    root = write_set(tmp_path / "set", classes_json(), files)
    files = layout.tile_files(root, [1, 2])
    images, valids, masks = layout.read_images(files, COLOURS)
    expected = np.where(truth == 9, data.IGNORE, truth)
    assert [n for n, _ in files] == ["Tile 1/images/a.jpg", "Tile 2/images/b.png"]
    assert np.array_equal(masks[0], expected) and np.array_equal(masks[1], expected)
    assert "2 mask pixels have a colour in no class" in capsys.readouterr().out
    Image.fromarray(image).save(root / "Tile 1" / "images" / "c.jpg")  # no mask
    with pytest.raises(DataError, match="c.jpg: has no mask"):
        layout.read_images(layout.tile_files(root, [1]), COLOURS)


def test_augmentation_turns_labels_with_their_image_and_padding_has_no_label():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 250, (40, 50, 3)).astype(np.uint8)
    labels = image[..., 0] % 7  # each label is a function of its pixel: a turn must keep them together
    ds = data.PatchDataset([image], [labels], 64, augment=True, seed=0)
    seen = set()
    for epoch in range(12):
        ds.epoch = epoch
        im, lab, _ = ds[0]
        im, lab = im.numpy(), lab.numpy()
        inside = lab != data.IGNORE
        assert np.array_equal(lab[inside], im[..., 0][inside] % 7)
        assert inside.sum() == 40 * 50  # padding (mirrored pixels) carries no label
        seen.add(tuple(np.argwhere(inside)[0]))  # where the image's corner went
    assert len(seen) >= 4
    padded, padded_labels = data.pad_to(image, labels, 64)
    assert padded.shape == (64, 64, 3) and (padded_labels[40:] == data.IGNORE).all()
    assert (padded_labels[:, 50:] == data.IGNORE).all() and np.array_equal(padded_labels[:40, :50], labels)
    assert np.array_equal(padded[40:44, :50], image[39:35:-1])  # mirrored, as np.pad's "symmetric"


# ---------------------------------------------------------------------------- inference and scores


def test_sliding_window_matches_a_whole_image_pass():
    torch.manual_seed(0)
    model = ResNetUNet(4)
    with torch.no_grad():  # give batch norm statistics other than 0 and 1
        model(torch.randn(4, 3, 96, 96))
    model.eval()
    image = np.random.default_rng(0).integers(0, 255, (300, 455, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).resize((113, 75)).resize((455, 300)))  # smooth, image-like
    with torch.no_grad():
        whole = model(to_input(torch.from_numpy(image.copy())[None]))[0]
    windows = predict.sliding_window(model, image, torch.float32, window=128)
    assert windows.shape == whole.shape
    assert (windows - whole).norm() / whole.norm() < 0.05
    assert (windows.argmax(0) == whole.argmax(0)).float().mean() > 0.98
    small = predict.predict_mask(model, image[:40, :33], torch.float32, window=128)
    assert small.shape == (40, 33)


class CountingModel(torch.nn.Module):
    """A stand-in network whose logits are the number of the window it is called on (1, 2, ...)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(1, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.full((x.shape[0], 2, *x.shape[2:]), float(self.calls))


def test_sliding_window_blends_windows_with_ramps_towards_their_edges():
    image = np.zeros((100, 150, 3), np.uint8)
    logits = predict.sliding_window(CountingModel(), image, torch.float32, window=64, overlap=16)[0].numpy()
    # the reference, written out: windows of 64 at starts 0, 48 (rows) and 0, 48, 96 (columns), each
    # weighted by min(distance to its nearer edge / 16, 1), taken from a pixel's centre
    def ramp(i):
        return np.minimum(np.minimum(i + 0.5, 64 - i - 0.5) / 16, 1)

    total, weights = np.zeros((112, 160)), np.zeros((112, 160))
    for k, (y, x) in enumerate([(y, x) for y in (0, 48) for x in (0, 48, 96)], start=1):
        w = ramp(np.arange(64))[:, None] * ramp(np.arange(64))[None, :]
        total[y : y + 64, x : x + 64] += k * w
        weights[y : y + 64, x : x + 64] += w
    assert np.allclose(logits, (total / weights)[:100, :150], atol=1e-5)
    assert logits[56, 56] != pytest.approx((1 + 2 + 4 + 5) / 4)  # not the plain mean of the four windows


def test_scenes_mapped_in_bands_equal_the_whole_image_window(tiny_run):
    model = fold_batch_norm(copy.deepcopy(tiny_run[0])).eval()
    image = np.random.default_rng(0).integers(0, 255, (300, 130, 3)).astype(np.uint8)
    whole = predict.sliding_window(model, image, torch.float32, window=96)
    bands = list(maps.logits_in_bands(model, image, torch.float32, window=96))
    assert len(bands) > 2 and torch.allclose(torch.cat(bands, 1), whole, atol=1e-4)


def test_test_time_augmentation_is_the_mean_over_the_eight_turns():
    torch.manual_seed(0)
    model = ResNetUNet(4).eval()
    image = np.random.default_rng(0).integers(0, 255, (8, 12, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).resize((96, 64)))  # one window: no blending
    logits = predict.sliding_window(model, image, torch.float32, 128, tta=True)
    by_hand = 0
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                turned = np.rot90(image, k)[:, ::-1] if flip else np.rot90(image, k)
                out = model(to_input(torch.from_numpy(turned.copy())[None]))[0].numpy()
                by_hand = by_hand + np.rot90(out[:, :, ::-1] if flip else out, -k, axes=(1, 2))
    assert np.allclose(logits.numpy(), by_hand / 8, atol=1e-4)
    # so the map of a mirrored scene is the mirrored map
    pair = [predict.predict_mask(model, im, torch.float32, 128, tta=True)
            for im in (image, np.ascontiguousarray(image[:, ::-1]))]
    assert np.array_equal(pair[0][:, ::-1], pair[1])


def test_scores_on_a_handmade_case():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]], np.uint8)
    conf = predict.confusion(truth, pred, 5)
    expected = np.zeros((5, 5), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 1, 1, 2, 1, 1
    assert np.array_equal(conf, expected)  # the pixels of no class (255) count nowhere
    s = predict.scores(conf, ["a", "b", "c", "d", "e"])
    assert s["iou"] == {"a": 1 / 3, "b": 2 / 3, "c": 1 / 2, "d": None, "e": None}
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == 4 / 6


def test_a_class_never_found_counts_as_iou_0_in_the_mean():
    truth = np.array([0, 0, 1, 1, 2, 2], np.uint8)
    pred = np.array([0, 0, 1, 1, 1, 1], np.uint8)  # class 2 is in the truth, never predicted
    s = predict.scores(predict.confusion(truth, pred, 4), ["a", "b", "c", "d"])
    assert s["iou"] == {"a": 1.0, "b": 0.5, "c": 0.0, "d": None}
    assert s["miou"] == pytest.approx(1.5 / 3)  # c counts, d (in neither) does not


# ---------------------------------------------------------------------------- real scenes


def write_tiff(path, samples, deflate=False, tile=None, planar=False, extra=()):
    """A TIFF written by hand, as GDAL writes them: (H, W, S) samples, little-endian, in strips of
    8 rows or in square tiles, bands interleaved or in planes, raw or deflated after horizontal
    differencing. The reference the reader is checked against."""
    h, w, s = samples.shape
    bh, bw = (tile, tile) if tile else (8, w)
    blocks = []
    for plane in [samples[..., i : i + 1] for i in range(s)] if planar else [samples]:
        for y in range(0, h, bh):
            for x in range(0, w, bw):
                b = plane[y : y + bh, x : x + bw]
                b = np.pad(b, ((0, bh - b.shape[0]), (0, bw - b.shape[1]), (0, 0))) if tile else b
                b = np.diff(b, axis=1, prepend=np.zeros_like(b[:, :1])) if deflate else b
                raw = b.astype(samples.dtype.newbyteorder("<")).tobytes()
                blocks.append(zlib.compress(raw) if deflate else raw)
    offsets = [8 + sum(map(len, blocks[:i])) for i in range(len(blocks))]
    kind = {"u": 1, "i": 2, "f": 3}[samples.dtype.kind]
    tags = {256: [w], 257: [h], 258: [samples.dtype.itemsize * 8] * s, 259: [8 if deflate else 1],
            262: [2 if s >= 3 else 1], 277: [s], 284: [2 if planar else 1], 317: [2 if deflate else 1],
            339: [kind] * s, **({338: list(extra)} if extra else {})}
    names = (322, 323, 324, 325) if tile else (None, 278, 273, 279)
    tags.update({k: v for k, v in zip(names, [[bw], [bh], offsets, list(map(len, blocks))]) if k})
    body, entries = bytearray(b"II*\0\0\0\0\0" + b"".join(blocks)), []
    for tag in sorted(tags):
        kind = 4 if tag in (256, 257, 273, 278, 279, 324, 325) else 3  # LONG or SHORT
        raw = struct.pack(f"<{len(tags[tag])}{'I' if kind == 4 else 'H'}", *tags[tag])
        body += b"\0" * (len(body) % 2)
        entries.append(struct.pack("<HHI", tag, kind, len(tags[tag])) + (raw.ljust(4, b"\0") if len(raw) <= 4
                                                                         else struct.pack("<I", len(body))))
        body += raw if len(raw) > 4 else b""
    body += b"\0" * (len(body) % 2)
    body[4:8] = struct.pack("<I", len(body))
    Path(path).write_bytes(body + struct.pack("<H", len(entries)) + b"".join(entries) + b"\0" * 4)


def stretched(band, low=2, high=98):
    """The percentile stretch written out for one band, in float64."""
    lo, hi = np.percentile(band.astype(np.float64), [low, high])
    return np.clip((band - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8)


# deflate, tile side, planar: each way of storing samples the reader knows, and two of them together
LAYOUTS = [(False, None, False), (True, None, False), (False, 16, False), (False, None, True),
           (True, 16, True)]


@pytest.mark.parametrize("deflate, tile, planar", LAYOUTS)
def test_tiffs_of_many_bands_and_16_bits_are_read_sample_by_sample(tmp_path, deflate, tile, planar):
    rng = np.random.default_rng(0)
    five = rng.integers(0, 256, (37, 45, 5)).astype(np.uint8)
    write_tiff(tmp_path / "five.tif", five, deflate, tile, planar)
    s = scene.read_scene(tmp_path / "five.tif")
    assert np.array_equal(s["samples"], five) and s["note"] == "5 band(s) of uint8"  # every band, as stored
    assert s["valid"] is None and s["geo"] is None
    assert np.array_equal(scene.display(s["samples"], None, [4, 3, 2]), five[..., [3, 2, 1]])
    # 16 bits, three bands and an alpha: each band shown stretched on its own, alpha 0 is no data (black)
    deep = rng.integers(1000, 52000, (37, 45, 4)).astype(np.uint16)
    deep[..., 3] = np.where(rng.random((37, 45)) < 0.1, 0, 65535)
    write_tiff(tmp_path / "deep.tif", deep, deflate, tile, planar, extra=[2])
    s = scene.read_scene(tmp_path / "deep.tif")
    assert np.array_equal(s["valid"], deep[..., 3] > 0) and np.array_equal(s["samples"], deep[..., :3])
    ours = scene.display(s["samples"], s["valid"]).astype(int)
    for b in range(3):
        ref = deep[..., b].astype(np.float64)
        lo, hi = np.percentile(ref[s["valid"]], [2, 98])
        expected = np.where(s["valid"], np.clip((ref - lo) * 255 / (hi - lo), 0, 255).astype(int), 0)
        assert np.abs(ours[..., b] - expected).max() <= 1
    empty = (deep[..., 3] == 0).sum()
    assert s["note"] == f"3 band(s) of uint16 and alpha; no data: {empty} pixels (alpha 0 {empty})"


def test_16_bit_single_band_is_stretched_and_unreadable_layouts_are_one_line(tmp_path):
    values = np.random.default_rng(1).integers(1000, 52000, (30, 40)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "band.tif")  # what Pillow's conversion to RGB clips
    s = scene.read_scene(tmp_path / "band.tif")
    ref = stretched(values)
    assert np.array_equal(scene.display(s["samples"], s["valid"]), np.stack([ref] * 3, -1))
    assert s["note"] == "1 band(s) of uint16"
    write_tiff(tmp_path / "zstd.tif", np.zeros((8, 8, 5), np.uint8))
    raw = bytearray((tmp_path / "zstd.tif").read_bytes())
    i = raw.index(struct.pack("<HHI", 259, 3, 1))
    raw[i + 8 : i + 10] = struct.pack("<H", 50000)  # compression 50000: ZSTD, which neither reader knows
    (tmp_path / "zstd.tif").write_bytes(raw)
    with pytest.raises(DataError, match="compression 50000.*neither read here .uncompressed, deflate, LZW."):
        scene.read_scene(tmp_path / "zstd.tif")
    write_tiff(tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(DataError, match="has 5 band.s., --bands asks for band 7"):
        layout.read_image(tmp_path / "five.tif", bands=[7, 1, 2])
    assert band_list("2,1") == [2, 1] and band_list("1,2,3,4,5") == [1, 2, 3, 4, 5]
    for text, counts in [("2,2", None), ("0,1", None), ("a", None), ("2,1", (1, 3))]:
        with pytest.raises(DataError, match=f"--bands {text}: expected"):
            band_list(text, counts=counts)


def geotiff_tags(transform=None, point=False, tie=(0.0, 0.0, 500000.0, 2800000.0)):
    """GeoTIFF tags of a UTM zone 40N raster in metres: 0.5 m pixels, raster position (i, j) of the
    tie point at map (x, y), or an affine transform; raster coordinates name pixel corners, or pixel
    centres with `point`."""
    tags = {34735: (3, (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 2 if point else 1, 3072, 0, 1, 32640,
                        3076, 0, 1, 9001)), 34737: (2, "WGS 84 / UTM zone 40N|")}
    if transform:
        return {**tags, 34264: (12, tuple(transform))}
    i, j, x, y = tie
    return {**tags, 33550: (12, (0.5, 0.5, 0.0)), 33922: (12, (i, j, 0.0, x, y, 0.0))}


def save_geotiff(path, image, tags):
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, (kind, value) in tags.items():
        info[tag], info.tagtype[tag] = value, kind
    Image.fromarray(image).save(path, tiffinfo=info)


def test_world_numbers_from_geotiff_tags():
    def centre_of_top_left_pixel(m, corner):  # the 4x4 transform applied to raster (0.5, 0.5) or (0, 0)
        i = j = 0.5 if corner else 0.0
        return [m[0] * i + m[1] * j + m[3], m[4] * i + m[5] * j + m[7]]

    m = [0.3, 0.1, 0, 400000.0, -0.05, -0.3, 0, 3000000.0, 0, 0, 0, 0, 0, 0, 0, 1]
    for point in (False, True):
        world = georef.world_from_tags(geotiff_tags(m, point))
        assert world[:4] == [0.3, -0.05, 0.1, -0.3]
        assert world[4:] == pytest.approx(centre_of_top_left_pixel(m, corner=not point))
    assert georef.world_from_tags(geotiff_tags()) == [0.5, 0.0, 0.0, -0.5, 500000.25, 2799999.75]
    # tie point at raster (2, 3): the top-left corner is 2 pixels left of and 3 above its map point
    tied = georef.world_from_tags(geotiff_tags(tie=(2.0, 3.0, 500100.0, 2800200.0)))
    assert tied == [0.5, 0.0, 0.0, -0.5, 500100 - 1.0 + 0.25, 2800200 + 1.5 - 0.25]
    assert georef.world_from_tags(geotiff_tags(point=True))[4:] == [500000.0, 2800000.0]


def test_gdal_no_data_float_and_32_bit_bands(tmp_path, tiny_run):
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.uint32):
        values = (rng.random((24, 30, 3)) * 5e6).astype(dtype)
        values[:5] = 0  # no data: every band 0
        write_tiff(tmp_path / "x.tif", values)
        raw = bytearray((tmp_path / "x.tif").read_bytes())  # add GDAL's no-data tag (ASCII "0")
        tiff_with_nodata(tmp_path / "x.tif", raw)
        s = scene.read_scene(tmp_path / "x.tif")
        assert s["valid"] is not None and not s["valid"][:5].any() and s["valid"][5:].all()
        for b in range(3):
            ref = values[5:, :, b].astype(np.float64)
            lo, hi = np.percentile(ref, [2, 98])
            expected = np.clip((values[..., b] - lo) * 255 / (hi - lo), 0, 255).astype(int)
            shown = scene.display(s["samples"], s["valid"])
            assert np.abs(shown[5:, :, b].astype(int) - expected[5:]).max() <= 1 and not shown[:5].any()
    out = tmp_path / "out"
    assert predict.main(["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "x.tif"), "--out", str(out),
                         "--device", "cpu", "--precision", "fp32"]) == 0
    mask = np.array(Image.open(out / "x_mask.png"))
    assert (mask[:5] == data.IGNORE).all() and (mask[5:] < 5).all()  # no data: no class


def tiff_with_nodata(path, raw):
    """Append GDAL's no-data tag (42113, ASCII '0') to the one image directory of a TIFF written by
    write_tiff: the directory is rewritten at the end of the file with one entry more."""
    ifd = struct.unpack("<I", raw[4:8])[0]
    n = struct.unpack("<H", raw[ifd : ifd + 2])[0]
    entries = [raw[ifd + 2 + 12 * k : ifd + 14 + 12 * k] for k in range(n)]
    entries.append(struct.pack("<HHI", 42113, 2, 2) + b"0\0\0\0")
    body = raw + b"\0" * (len(raw) % 2)
    body[4:8] = struct.pack("<I", len(body))
    Path(path).write_bytes(bytes(body) + struct.pack("<H", len(entries)) + b"".join(entries) + b"\0" * 4)


def test_a_geotiff_is_mapped_to_a_geotiff_and_areas(tiny_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (70, 90, 4)).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0  # an orthomosaic's empty border: no data
    save_geotiff(tmp_path / "ortho.tif", rgba, geotiff_tags())
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "ortho.tif"), "--out", str(out)]
    assert predict.main(args + ["--precision", "fp32"]) == 0
    mask = Image.open(out / "ortho_mask.tif")
    for tag, (kind, value) in geotiff_tags().items():  # the georeferencing, value by value
        assert mask.tag_v2[tag] == value and mask.tag_v2.tagtype[tag] == kind
    classes = np.array(mask)
    assert classes.shape == (70, 90)
    assert (classes[:, :20] == data.IGNORE).all() and (classes[:, 20:] < 5).all()
    world = [float(v) for v in (out / "ortho_overlay.jgw").read_text().split()]
    assert world == [0.5, 0.0, 0.0, -0.5, 500000.25, 2799999.75]
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert [r["class"] for r in rows] == torch.load(tiny_run[1] / "ckpt.pt", weights_only=True)["classes"]
    assert sum(int(r["pixels"]) for r in rows) == 70 * 70  # the valid pixels
    assert {r["mask"] for r in rows} == {"ortho_mask.tif"}  # the mask these pixels were counted on
    for r in rows:
        assert float(r["hectares"]) == pytest.approx(int(r["pixels"]) * 0.25 / 1e4, abs=1e-4)
        assert float(r["share"]) == pytest.approx(int(r["pixels"]) / 4900, abs=1e-4)


def test_world_files_carry_over_and_shared_names_stay_apart(tiny_run, tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "scene.jpg")
    (tmp_path / "a" / "scene.jgw").write_text("0.3\n0\n0\n-0.3\n400000.15\n3000000.15\n")
    (tmp_path / "a" / "scene.prj").write_text("PROJCS[...]")
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32"]
    scenes = [str(tmp_path / f / "scene.jpg") for f in ("a", "b")]
    assert predict.main(args + scenes + scenes[:1]) == 0  # the same file twice is mapped once
    said = capsys.readouterr().out
    assert "share a file name" in said and said.count("a_scene_mask.png") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "a_scene_mask.pgw", "a_scene_mask.png", "a_scene_mask.prj", "a_scene_overlay.jgw",
        "a_scene_overlay.jpg", "a_scene_overlay.prj", "areas.csv", "b_scene_mask.png", "b_scene_overlay.jpg"]
    world = (out / "a_scene_mask.pgw").read_text().split()
    assert world == ["0.3", "0.0", "0.0", "-0.3", "400000.15", "3000000.15"]
    assert all(r["hectares"] == "" for r in csv.DictReader(open(out / "areas.csv")))  # a world file: no units


def test_scenes_past_pillows_guard_are_mapped_with_progress(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the guard refuses images over 2000 pixels
    monkeypatch.setattr(maps, "WINDOW", 96)  # several bands of windows
    image = np.random.default_rng(0).integers(0, 256, (200, 60, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    assert np.array_equal(layout.read_image(tmp_path / "big.png")[0], image)  # training reads it too
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "big.png"), "--out", str(tmp_path / "o")]
    assert predict.main(args + ["--precision", "fp32"]) == 0
    assert Image.MAX_IMAGE_PIXELS == 1000  # and back on after it
    said = capsys.readouterr().out
    assert re.search(r"rows \d+/200  [\d.]+ MP/s  \d+s left", said)
    monkeypatch.undo()
    assert Image.open(tmp_path / "o" / "big_mask.png").size == (60, 200)


# ---------------------------------------------------------------------------- files from the field

FIXTURES = HERE / "tests" / "fixtures"  # written by GDAL (make.sh there); what GDAL says: *.expected.json
READABLE = sorted(p.name[: -len(".expected.json")] for p in FIXTURES.glob("*.expected.json")
                  if json.loads(p.read_text()).get("gdal_opens") and not p.name.startswith("hostile"))


@pytest.mark.parametrize("name", READABLE)
def test_field_files_are_read_as_gdal_reads_them(name):
    """Every layout GDAL wrote (masks inside a TIFF, after a JPEG, in a .msk; NaN and infinity; float64;
    MinIsBlack; LZW with both predictors; tiles; bands in planes; upper-case sidecars): the valid pixels
    and each band's mean over them, against GDAL's own reading."""
    gdal = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    s = scene.read_scene(FIXTURES / name)
    h, w, n = s["samples"].shape
    assert (w, h, n) == (gdal["width"], gdal["height"], gdal["bands"])
    assert np.isfinite(s["samples"]).all()  # no data never leaves a NaN for the network or the stretch
    if n != 3 or s["samples"].dtype != np.uint8:  # every band count is said, two bands as much as thirteen
        assert s["note"].startswith(f"{n} band(s) of {s['samples'].dtype}")
    valid = np.ones((h, w), bool) if s["valid"] is None else s["valid"]
    if name == "ORTHO_0001.JPG":  # its no-data value is in .JPG.AUX.XML, which GDAL on Linux does not see
        assert np.array_equal(valid, (s["samples"] != 0).any(-1)) and "no-data value 0" in s["note"]
        assert s["geo"]["world"] == [0.25, 0.0, 0.0, -0.25, 326500.125, 2787999.875]  # from .JGW
        assert s["geo"]["pixel_m2"] == 0.0625 and "UTM_Zone_40N" in s["geo"]["crs"]  # metres, from .PRJ
        return
    for b, band in enumerate(gdal["band"]):
        assert valid.sum() == band["valid_pixels"] - band["nan_pixels"] - band["inf_pixels"]
        assert s["samples"][..., b][valid].astype(np.float64).mean() == pytest.approx(band["mean"], rel=1e-9)


def test_nan_and_infinity_are_no_data_and_the_stretch_ignores_them():
    s = scene.read_scene(FIXTURES / "float32_3band_nan_inf.tif")
    assert s["note"] == "3 band(s) of float32; no data: 2 pixels (NaN or infinite 2)"
    shown, valid = scene.display(s["samples"], s["valid"]), s["valid"]
    assert (shown[~valid] == 0).all() and shown[valid].std() > 20  # no data black, the rest not
    for b in range(3):  # each band stretched between percentiles of its finite samples
        lo, hi = np.percentile(s["samples"][..., b][valid].astype(np.float64), [2, 98])
        ref = np.clip((s["samples"][..., b][valid] - lo) * 255 / (hi - lo), 0, 255).astype(int)
        assert np.abs(shown[..., b][valid].astype(int) - ref).max() <= 1


def test_a_masked_orthophoto_maps_no_collar_and_counts_no_collar(tiny_run, tmp_path, capsys):
    """The black collar GDAL marks with a mask band (inside a JPEG-YCbCr TIFF, or a .msk beside a
    JPEG) is no class in the map and no hectares in areas.csv."""
    names = ["rgb_jpeg_ycbcr_internal_mask.tif", "rgb_jpeg_external_mask.jpg", "rgb_jpeg_appended_mask.jpg"]
    for name in names + ["rgb_jpeg_external_mask.jpg.msk"]:
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32"]
    assert predict.main(args + [str(tmp_path / n) for n in names]) == 0
    rows = list(csv.DictReader(open(out / "areas.csv")))
    for name in names:
        gdal = json.loads((FIXTURES / f"{name}.expected.json").read_text())["valid_pixels"]
        assert sum(int(r["pixels"]) for r in rows if r["image"].endswith(name)) == gdal == 960
        suffix = "tif" if name.endswith("tif") else "png"
        mask = np.array(Image.open(out / f"{Path(name).stem}_mask.{suffix}"))
        assert (mask == data.IGNORE).sum() == 32 * 48 - 960
    said = capsys.readouterr().out
    assert "no data: 576 pixels (internal mask 576)" in said and "(.msk 576)" in said
    assert "(mask after the JPEG 576)" in said


def test_sidecars_are_found_whatever_their_case(tiny_run, tmp_path):
    for name in ["ORTHO_0001.JPG", "ORTHO_0001.JGW", "ORTHO_0001.PRJ"]:
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32",
            "--suggest", "2"]
    assert predict.main(args + [str(tmp_path / "ORTHO_0001.JPG")]) == 0
    world = (out / "ORTHO_0001_mask.pgw").read_text().split()
    assert [float(v) for v in world] == [0.25, 0.0, 0.0, -0.25, 326500.125, 2787999.875]
    assert (out / "ORTHO_0001_mask.prj").read_text() == (FIXTURES / "ORTHO_0001.PRJ").read_text()
    doc = json.loads((out / "suggestions.geojson").read_text())
    # the 48x32 map offers 1 or 2 places 32 pixels apart, by where the model doubts (which differs with
    # the CPU's kernels): each on the map at its pixel's centre
    assert 1 <= len(doc["features"]) == len(list(csv.DictReader(open(out / "suggestions.csv")))) <= 2
    for feature in doc["features"]:
        x, y = feature["properties"]["x"], feature["properties"]["y"]
        assert feature["geometry"]["coordinates"] == [326500.125 + 0.25 * x, 2787999.875 - 0.25 * y]
    areas = csv.DictReader(open(out / "areas.csv"))  # hectares of 0.25 m pixels, written to 4 decimals
    assert all(float(r["hectares"]) == pytest.approx(int(r["pixels"]) * 0.0625 / 1e4, abs=6e-5)
               for r in areas)


def test_damaged_or_hostile_headers_are_one_line_and_the_other_images_are_mapped(tiny_run, tmp_path,
                                                                                 monkeypatch, capsys):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bombs = {  # each header claims what its few bytes cannot hold
        "bomb.png": b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 40001)) + chunk(b"IEND", b""),  # 40000x40000 in 118 bytes
        **{n: (FIXTURES / n).read_bytes() for n in ["hostile_65535_samples.tif", "hostile_100000x100000.tif",
                                                   "hostile_5band_strips_cover_16_of_64_rows.tif"]}}
    for name, raw in bombs.items():
        (tmp_path / name).write_bytes(raw)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "good.png")
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32", str(tmp_path)]
    assert predict.main(args) == 1
    said = capsys.readouterr().out.splitlines()
    for name in bombs:
        assert sum(line.startswith(f"skipped: {tmp_path / name}: ") for line in said) == 1
    said = "\n".join(said)
    assert "damaged TIFF: 1 blocks of pixels, its size needs 4" in said  # never uninitialised memory
    assert "bomb.png: damaged or hostile header: 40000x40000 pixels of 1 band(s) cannot come out of" in said
    assert (out / "good_mask.png").exists() and len(list(out.glob("*_mask.png"))) == 1
    monkeypatch.setattr(scene, "MAX_MEGAPIXELS", 0.001)  # our own guard says how to raise it
    with pytest.raises(DataError, match=r"50x40 pixels .* past the limit of 0.001 MP.*MAX_MEGAPIXELS=1"):
        scene.read_scene(tmp_path / "good.png")
    monkeypatch.setattr(scene, "free_memory", lambda: 10**5)  # and refuses what the memory cannot hold
    monkeypatch.setattr(scene, "MAX_MEGAPIXELS", 2000)
    with pytest.raises(DataError, match="64x64 pixels of 4 band.s. need about 0 MB of memory, this machine"):
        scene.read_scene(FIXTURES / "multispectral_uint16_utm40n.tif")


def test_index_masks_and_masks_that_match_no_class(tmp_path, capsys):
    classes = json.loads((FIXTURES / "classes.json").read_text())
    colours = [layout.hex_to_rgb(c["color"]) for c in classes["classes"]]
    index = np.array(Image.open(FIXTURES / "scene_index_mask.png"))
    mask, unknown = layout.read_mask(FIXTURES / "scene_index_mask.png", colours, index.shape)
    assert np.array_equal(mask, index) and unknown == 0 and index.max() == 4  # LandCover.ai's layout
    grey = [(0, 0, 0), (255, 255, 255)]  # a black and white mask of classes.json colours stays colours
    Image.fromarray(np.where(index > 2, 255, 0).astype(np.uint8)).save(tmp_path / "bw.png")
    assert np.array_equal(layout.read_mask(tmp_path / "bw.png", grey, index.shape)[0], (index > 2))
    capsys.readouterr()
    mask, unknown = layout.read_mask(FIXTURES / "scene_colour_mask_via_jpeg.png", colours, index.shape)
    said = capsys.readouterr().out
    assert "scene_colour_mask_via_jpeg.png: only 1% of the mask's pixels have a colour of classes" in said
    assert "saved as JPEG" in said and unknown > 0.9 * mask.size


def test_a_run_with_no_label_is_refused_and_writes_nothing(tiny, tmp_path, capsys):
    root = tmp_path / "set"
    shutil.copytree(tiny, root)
    for mask in root.glob("Tile */masks/*.png"):  # the masks of another palette: no pixel matches
        Image.fromarray(255 - np.array(Image.open(mask).convert("RGB"))).save(mask)
    out = tmp_path / "run"
    assert command_line(train.main, tiny_args(root, out)) == 2 and not out.exists()
    assert capsys.readouterr().err.startswith("error: no training pixel has a label")


def test_click_files_as_spreadsheets_and_other_programs_write_them(tmp_path):
    info = {n: scene.image_info(FIXTURES / n) for n in ["scene_rgb.png", "ORTHO_0001.JPG",
                                                          "multispectral_uint16_utm40n.tif"]}
    expected = json.loads((FIXTURES / "clicks.expected.json").read_text())
    names = expected["classes"]
    rows = [(Path(i.replace("\\", "/")).name, x, y, names.index(c)) for i, x, y, c in expected["csv_rows"]]
    for name in ["clicks_excel_utf8.csv", "clicks_excel_semicolon.csv"]:  # a BOM, CRLF; semicolons
        by_image, _ = clicks.read_clicks([FIXTURES / name], info, names)
        assert sorted((n, *p) for n, points in by_image.items() for p in points) == sorted(rows)
    utf16 = tmp_path / "unicode.txt"  # Excel's "Unicode text": UTF-16, tabs
    utf16.write_text("image\tx\ty\tclass\nscene_rgb.png\t5\t7\tWater\n", encoding="utf-16")
    assert clicks.read_clicks([utf16], info, names)[0] == {"scene_rgb.png": [(5, 7, 0)]}
    for name in ["clicks_label_studio.json", "clicks_empty_list.json"]:
        with pytest.raises(DataError, match=f"{name}: not a GeoJSON FeatureCollection .its top level is a"):
            clicks.read_clicks([FIXTURES / name], info, names)
    for name, what in [("clicks_nan.geojson", "nan"), ("clicks_infinity.geojson", "inf")]:
        with pytest.raises(DataError, match=rf"{name}: feature \d: coordinates .*{what}.* are not finite"):
            clicks.read_clicks([FIXTURES / name], info, names)
    with pytest.raises(DataError, match="clicks_crs_null_properties.geojson: crs .* is not an EPSG code"):
        clicks.read_clicks([FIXTURES / "clicks_crs_null_properties.geojson"], info, names)


def test_areas_on_a_geographic_grid_sum_to_the_earth(tiny_run, tmp_path):
    (tmp_path / "globe.tif").write_bytes((FIXTURES / "globe_4326_10deg.tif").read_bytes())
    out = tmp_path / "maps"
    assert predict.main(["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "globe.tif"), "--out",
                         str(out), "--precision", "fp32"]) == 0
    hectares = sum(float(r["hectares"]) for r in csv.DictReader(open(out / "areas.csv")))
    sphere = 4 * math.pi * 6371008.8**2 / 1e4
    assert hectares == pytest.approx(sphere, rel=1e-6)  # each row at its own latitude, not one area for all
    rows = json.loads((FIXTURES / "globe_4326_10deg.areas.json").read_text())["pixel_ha_by_row"]
    geo = scene.image_info(tmp_path / "globe.tif")[1]
    assert np.allclose(np.array(geo["pixel_m2"]) / 1e4, rows, rtol=1e-9)


# ---------------------------------------------------------------------------- many bands, one scale, GPS


def nir_set(root, size=64, seed=0):
    """Two classes that differ only in band 4, a near-infrared band (bands 1-3: the same noise for
    both), as 16-bit TIFFs in the Kaggle layout: Tiles 1-2 to train on, Tile 3 to validate."""
    rng = np.random.default_rng(seed)
    for t in (1, 2, 3):
        for folder in ("images", "masks"):
            (root / f"Tile {t}" / folder).mkdir(parents=True)
        for k in range(2):
            cls = (synthetic.smooth_noise(rng, size, size, 4) > 0.5).astype(np.uint8)
            bands = rng.integers(1000, 3000, (size, size, 4)).astype(np.uint16)
            bands[..., 3] = np.where(cls == 1, 3500, 1500) + rng.integers(-300, 300, (size, size))
            write_tiff(root / f"Tile {t}" / "images" / f"s{k}.tif", bands)
            mask = Image.fromarray(np.array(COLOURS[:2], np.uint8)[cls])
            mask.save(root / f"Tile {t}" / "masks" / f"s{k}.png")
    (root / "classes.json").write_text(classes_json(COLOURS[:2]))
    return root


def test_a_fourth_band_is_learned_where_rgb_alone_cannot_learn_it(tmp_path):
    root = nir_set(tmp_path / "set")
    miou = {}
    for name, extra in [("all", []), ("rgb", ["--bands", "1,2,3"])]:
        train.main(tiny_args(root, tmp_path / name, "--points", "0", "--epochs", "3", *extra))
        miou[name] = json.loads((tmp_path / name / "metrics.json").read_text())["history"][-1]["miou"]
    assert miou["all"] > 0.55 and miou["rgb"] < 0.45  # 0.720 and 0.331 measured on a 2-core Xeon
    ckpt = torch.load(tmp_path / "all" / "ckpt.pt", weights_only=True)
    assert ckpt["bands"] == [1, 2, 3, 4] and ckpt["model"]["conv1.weight"].shape[1] == 4
    pixels = np.concatenate([scene.read_scene(p)["samples"].reshape(-1, 4).astype(np.float64)
                             for t in (1, 2) for p in sorted((root / f"Tile {t}" / "images").iterdir())])
    assert np.allclose(ckpt["norm"]["mean"], pixels.mean(0))
    assert np.allclose(ckpt["norm"]["std"], pixels.std(0))
    # a scene of another season, twice as bright: the training images' scale, not its own
    s = scene.read_scene(root / "Tile 3" / "images" / "s0.tif")
    brighter = {**s, "samples": s["samples"] * 2}
    (x1, norm), (x2, _) = model.model_input(s, ckpt), model.model_input(brighter, ckpt)
    a, b = model.to_input(torch.from_numpy(x1[None]), norm), model.to_input(torch.from_numpy(x2[None]), norm)
    std = torch.tensor(norm["std"]).view(1, 4, 1, 1)
    assert torch.allclose(b - a, torch.from_numpy(x1[None]).permute(0, 3, 1, 2).float() / std, atol=1e-4)
    assert np.array_equal(scene.display(x1, None), scene.display(x2, None))  # the per-scene stretch: the same


def test_imagenet_filters_are_carried_over_to_any_number_of_bands(tmp_path):
    state = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(state, tmp_path / "r34.pth")
    for n in (1, 2, 4, 13):
        net = build_model(5, str(tmp_path / "r34.pth"), in_channels=n)
        assert torch.equal(net.conv1.weight, state["conv1.weight"][:, [i % 3 for i in range(n)]] * (3 / n))
        assert net(torch.zeros(1, n, 64, 64)).shape == (1, 5, 64, 64)
    assert torch.equal(build_model(5, str(tmp_path / "r34.pth")).conv1.weight, state["conv1.weight"])


@pytest.mark.skipif(importlib.util.find_spec("pyproj") is None, reason="needs pyproj: pip install pyproj")
def test_gps_points_land_where_gdal_puts_them_and_a_4_band_scene_trains_maps_and_suggests(tmp_path, capsys):
    name = "multispectral_uint16_utm40n.tif"
    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / name).write_bytes((FIXTURES / name).read_bytes())
    info = {name: scene.image_info(folder / name)}
    expected = json.loads((FIXTURES / "clicks.expected.json").read_text())
    names = expected["classes"]
    gps = [p for p in expected["wgs84_points"] if p["image"] == name]  # the others lie on ORTHO_0001.JPG
    points = sorted((*p["gdallocationinfo_pixel"], names.index(p["class"])) for p in gps)
    by_image, _ = clicks.read_clicks([FIXTURES / "clicks_wgs84.geojson"], info, names)  # RFC 7946: no crs
    assert sorted(by_image[name]) == points and "read as RFC 7946 GeoJSON" in capsys.readouterr().out
    rows = [(*p["lonlat"], p["class"]) for p in gps]
    (tmp_path / "gps.csv").write_text("lon;lat;class\n" + "".join(f"{x};{y};{c}\n" for x, y, c in rows))
    assert sorted(clicks.read_clicks([tmp_path / "gps.csv"], info, names)[0][name]) == points
    utm = [(*p["utm40n"], p["class"]) for p in gps]
    (tmp_path / "utm.csv").write_text("x,y,class\n" + "".join(f"{x},{y},{c}\n" for x, y, c in utm))
    utm = clicks.read_clicks([tmp_path / "utm.csv"], info, names, crs="EPSG:32640")[0]
    assert sorted(utm[name]) == points
    run, out = tmp_path / "run", tmp_path / "maps"
    train.main(tiny_args(folder, run, "--point-labels", str(FIXTURES / "clicks_wgs84.geojson")))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["bands"] == [1, 2, 3, 4] and len(ckpt["norm"]["mean"]) == 4
    assert predict.main(["--ckpt", str(run / "ckpt.pt"), str(folder), "--out", str(out), "--suggest", "2",
                         "--precision", "fp32", "--show-bands", "4,1,2"]) == 0
    assert len(json.loads((out / "suggestions.geojson").read_text())["features"]) == 2
    assert Image.open(out / "multispectral_uint16_utm40n_mask.tif").size == (64, 64)


# ---------------------------------------------------------------------------- training end to end


def test_one_epoch_writes_everything_and_the_checkpoint_reloads(tiny, tiny_run):
    model, run = tiny_run
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert set(history[0]) == {"epoch", "loss", "miou", "iou", "pixel_acc", "seconds", "patches_per_s"}
    assert 0 < history[0]["loss"] < 1 and 0 <= history[0]["miou"] <= 1
    lines = (run / "points.csv").read_text().splitlines()
    assert lines[0] == "image,x,y,class" and len(lines) == 1 + 2 * 2 * 4 * 100  # tiles 1-2, 4 patches each
    names, _, masks = tile_masks(tiny, [1, 2], layout.read_classes(tiny)[1])
    rows = [line.split(",") for line in lines[1:]]
    assert all(masks[names.index(n)][int(y), int(x)] == int(c) for n, x, y, c in rows)  # each on its class
    assert Image.open(run / "panel.png").size == (4 * 64 + 30, 64)
    assert Image.open(run / "points.jpg").size == (96, 96)  # the first training image
    reloaded, _ = load_checkpoint(run / "ckpt.pt")
    ckpt = read_checkpoint(run / "ckpt.pt", mmap=False)
    assert torch.serialization.get_crc32_options()  # saved without CRC-32s, the setting left as it was
    # cosine schedule: 2 steps, the last one at half the peak learning rate
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5)
    image = layout.read_image(tiny / "Tile 3" / "images" / "image_part_001.jpg")[0]
    args = (image, torch.float32)
    assert np.array_equal(predict.predict_mask(model.eval(), *args), predict.predict_mask(reloaded, *args))


def test_predict_writes_masks_overlays_and_scores(tiny, tiny_run, tmp_path, capsys):
    ckpt = tiny_run[1] / "ckpt.pt"
    folder = tmp_path / "in"
    folder.mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, (50, 70, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgba[..., 0], "L").save(folder / "grey.tif")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "pred"
    assert predict.main(["--ckpt", str(ckpt), str(folder), "--out", str(out), "--precision", "fp32"]) == 1
    said = capsys.readouterr().out
    assert "broken.jpg" in said.splitlines()[-1]  # the bad one is listed at the end
    palette = {tuple(c) for c in torch.load(ckpt, weights_only=True)["colours"]}
    for stem in ["rgba", "grey"]:
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.size == (70, 50) and Image.open(out / f"{stem}_overlay.jpg").size == (70, 50)
        classes = np.array(mask)
        empty = rgba[..., 3] == 0 if stem == "rgba" else np.zeros((50, 70), bool)  # alpha 0: no data
        assert (classes[empty] == data.IGNORE).all() and (classes[~empty] < len(palette)).all()
        assert {c for _, c in mask.convert("RGB").getcolors()} <= palette | {(0, 0, 0)}
    # scoring: the numbers train.py printed for the same tile and the same checkpoint
    assert predict.main(["--ckpt", str(ckpt), "--data", str(tiny), "--tiles", "3", "--out", str(out),
                         "--precision", "fp32", "--overwrite"]) == 0
    scored = json.loads((out / "metrics.json").read_text())
    trained = json.loads((tiny_run[1] / "metrics.json").read_text())["history"][-1]
    assert scored["miou"] == pytest.approx(trained["miou"]) and scored["iou"] == trained["iou"]
    assert np.array(scored["confusion"]).shape == (5, 5)
    assert (out / "Tile 3_images_image_part_001_compare.png").exists()


def test_torchrun_ranks_end_with_identical_weights(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = """if True:  # each rank records the points it trains on and the patches its sampler gives it
        import json, sys, torch, train
        seen, make_labels, sampler = {"indices": []}, train.make_labels, train.DistributedSampler
        def recorded(args, d):
            labels, seen["points"] = make_labels(args, d)
            return labels, seen["points"]
        class Recorded(sampler):
            def set_epoch(self, epoch):
                super().set_epoch(epoch)
                seen["indices"].append(list(iter(self)))
        train.make_labels, train.DistributedSampler = recorded, Recorded
        m = train.main(sys.argv[2:])
        torch.save(dict(m.named_parameters()), sys.argv[1])
        json.dump(seen, open(sys.argv[1] + ".json", "w"))
    """
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-c", script, tmp_path / f"rank{rank}.pt", *tiny_args(tiny, tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "epoch 1/1" in outs[0][0] and outs[1][0] == ""  # rank 0 alone prints
    written = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(written[k], a[k]) for k in a)  # and writes what it trained
    seen = [json.load(open(tmp_path / f"rank{r}.pt.json")) for r in range(2)]
    assert seen[0]["points"] == seen[1]["points"] and len(seen[0]["points"]) == 2 * 2 * 4 * 100  # same points
    halves = [set(s["indices"][0]) for s in seen]  # and each rank half of the 16 patches
    assert len(halves[0]) == len(halves[1]) == 8 and halves[0] | halves[1] == set(range(16))


# ---------------------------------------------------------------------------- bad input: one line, exit 2


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    train_run = start_script("train.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    predict_run = start_script("predict.py", "--ckpt", garbage, "x.jpg", "--out", tmp_path / "p")
    expected = [(train_run, "nowhere: no such folder"), (predict_run, "garbage.pt: not a checkpoint")]
    for proc, message in expected:
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 2 and err.count("\n") == 1 and message in err, err


def test_bad_arguments_are_one_line_and_exit_code_2(tiny, tiny_run, tmp_path, capsys):
    import bench

    blocked = tmp_path / "a_file"
    blocked.write_text("")  # a folder cannot be made under a file: --out is refused, before any long work
    nowhere, ckpt = tmp_path / "nowhere", tiny_run[1] / "ckpt.pt"
    rows = [  # script, arguments, the start of the message
        (train, ["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
        (train, ["--lr", "-1"], "--lr -1.0: must be a number more than 0"),
        (train, ["--lr", "nan"], "--lr nan: must be"),
        (train, ["--seed", "-1"], "--seed -1: must be from 0"),
        (train, ["--points", "-5"], "--points -5: must be 0"),
        (train, ["--alpha", "0"], "--alpha 0.0: must be more than 0"),
        (train, ["--gamma", "-1"], "--gamma -1.0: must be 0"),
        (train, ["--epochs", "0"], "--epochs 0: must be 1 or more"),
        (train, ["--patch", "48"], "--patch 48: must be a multiple of 32"),
        (train, ["--patch", "4096"], "--patch 4096: larger than every training image (the largest is 96x96)"),
        (train, ["--out", blocked / "run", "--data", nowhere], f"--out {blocked / 'run'}: cannot be written"),
        (predict, ["--ckpt", ckpt, "x.jpg", "--out", blocked / "p"], f"--out {blocked / 'p'}: cannot be"),
        (bench, ["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    ]
    for script, args, message in rows:
        if script is train:
            args = tiny_args(tiny, tmp_path / "run", *args)  # the later of a repeated flag counts
        assert command_line(script.main, list(map(str, args))) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any((tmp_path / "run").glob("*"))  # no row got as far as writing in the run folder


def test_validating_on_a_training_tile_warns_once_and_trains(tiny, tmp_path, capsys):
    train.main(tiny_args(tiny, tmp_path / "run", "--train-tiles", "1,2", "--val-tiles", "2"))
    said = capsys.readouterr().out
    assert said.count("warning: validation tile(s) 2 are also trained on") == 1
    outputs = ["ckpt.pt", "metrics.json", "classes.json", "panel.png", "points.csv", "points.jpg"]
    assert said.splitlines()[-1] == "done: " + ", ".join(str(tmp_path / "run" / f) for f in outputs)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "holds no images"),
        ("no classes.json", "classes.json: not found"),
        ("classes.json unparsable", "classes.json: not a list of classes"),
        ("classes without colours", "classes.json: not a list of classes"),
        ("colour not #RRGGBB", "colour '#12345' is not of the form #RRGGBB"),
        ("mask of another size", "a.png: mask is 5x4, its image is 6x4"),
        ("truncated image", "a.jpg: cannot read image"),
        ("no such tile", "has no Tile 9"),
        ("tiles not numbers", "tiles 'one': expected tile numbers"),
    ],
)
def test_bad_data_sets(tmp_path, case, message):
    image, mask = np.full((4, 6, 3), 128, np.uint8), Image.new("RGB", (6, 4), COLOURS[0])
    classes, tiles = classes_json(), "1"
    if case == "no classes.json":
        classes = None
    elif case == "classes.json unparsable":
        classes = "{not json"
    elif case == "classes without colours":
        classes = json.dumps({"classes": [{"title": "water"}]})
    elif case == "colour not #RRGGBB":
        classes = json.dumps({"classes": [{"title": "water", "color": "#12345"}]})
    elif case == "mask of another size":
        mask = Image.new("RGB", (5, 4), COLOURS[0])
    elif case == "no such tile":
        tiles = "9"
    elif case == "tiles not numbers":
        tiles = "one"
    files = {} if case == "empty folder" else {"Tile 1/images/a.jpg": (image, mask)}
    root = write_set(tmp_path / "set", classes or "", files)
    if classes is None:
        (root / "classes.json").unlink()
    if case == "truncated image":
        path = root / "Tile 1" / "images" / "a.jpg"
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        train.main(["--data", str(root), "--out", str(tmp_path / "run"), "--train-tiles", tiles,
                    "--val-tiles", tiles])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bad_device(tiny, tmp_path):
    with pytest.raises(DataError, match="no CUDA GPU"):
        train.main(tiny_args(tiny, tmp_path / "run", "--device", "cuda"))
    with pytest.raises(DataError, match="not a device"):
        predict.main(["--ckpt", "x.pt", "--device", "gpu0", "a.jpg", "--out", str(tmp_path / "p")])


def test_points_csv_is_checked_and_used(tiny, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("image,x,y,class\nTile 1/images/image_part_001.jpg,50,60,1\n"
                    "Tile 3/images/image_part_001.jpg,5,5,0\n")
    train.main(tiny_args(tiny, tmp_path / "run", "--point-labels", str(good), "--lr-schedule", "constant",
                         "--class-weights", "none"))
    optimizer = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == 1e-3
    # the row of Tile 3 (validation, not trained on) is skipped; the one point is the one trained on
    trained = (tmp_path / "run" / "points.csv").read_text().splitlines()[1:]
    assert trained == ["Tile 1/images/image_part_001.jpg,50,60,1"]
    for row, message in [
        ("Tile 1/images/nope.jpg,1,1,0", "unknown image"),
        ("Tile 1/images/image_part_001.jpg,96,1,0", r"point \(96, 1\) is outside"),
        ("Tile 1/images/image_part_001.jpg,1,1,7", "class '7' is not in classes.json"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text("image,x,y,class\n" + row + "\n")
        with pytest.raises(DataError, match=message):
            train.main(tiny_args(tiny, tmp_path / "bad", "--point-labels", str(bad)))


def test_small_images_are_padded_and_big_point_counts_capped(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def image_and_mask(h, w):
        return rng.integers(0, 255, (h, w, 3)).astype(np.uint8), Image.fromarray(
            np.array(COLOURS, np.uint8)[rng.integers(0, 3, (h, w))])

    files = {"Tile 1/images/a.png": image_and_mask(40, 50), "Tile 1/images/b.png": image_and_mask(64, 70),
             "Tile 2/images/a.png": image_and_mask(40, 50)}
    root = write_set(tmp_path / "set", classes_json(), files)
    train.main(tiny_args(root, tmp_path / "run", "--points", "5000"))
    said = capsys.readouterr().out
    assert said.count("fewer labelled pixels") == 1 and "epoch 1/1" in said
    assert "--patch 64: 1 of 2 training images are smaller and are padded" in said
    rows = [r.split(",") for r in (tmp_path / "run" / "points.csv").read_text().splitlines()[1:]]
    assert len(rows) == 40 * 50 + 64 * 70  # every pixel of the two images, each once
    shapes = {"Tile 1/images/a.png": (40, 50), "Tile 1/images/b.png": (64, 70)}
    assert {(n, int(x), int(y)) for n, x, y, _ in rows} == {(n, x, y) for n, (h, w) in shapes.items()
                                                           for y in range(h) for x in range(w)}


def test_predict_refuses_a_data_set_with_other_classes(tiny_run, tmp_path):
    files = {"Tile 1/images/a.png": (np.zeros((4, 4, 3), np.uint8), None)}
    other = write_set(tmp_path / "other", classes_json(), files)
    with pytest.raises(DataError, match="classes differ"):
        predict.main(["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--data", str(other), "--out",
                      str(tmp_path / "p")])
    with pytest.raises(DataError, match="no such checkpoint"):
        predict.main(["--ckpt", str(tmp_path / "missing.pt"), "a.jpg", "--out", str(tmp_path / "p")])


def test_predict_flags_tta_bands_and_a_model_transformation_carried_into_the_mask(tiny_run, tmp_path):
    rng = np.random.default_rng(5)
    five = rng.integers(0, 256, (40, 56, 5)).astype(np.uint8)  # five bands: no alpha to guess at
    write_tiff(tmp_path / "five.tif", five)
    m = [0.3, 0.1, 0, 400000.0, -0.05, -0.3, 0, 3000000.0, 0, 0, 0, 0, 0, 0, 0, 1]
    save_geotiff(tmp_path / "turned.tif", five[..., :3], geotiff_tags(m))
    model = fold_batch_norm(copy.deepcopy(tiny_run[0])).eval()
    base = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--device", "cpu", "--precision", "fp32"]
    for extra, image in [([], five[..., :3]), (["--bands", "4,2,1"], five[..., [3, 1, 0]]),
                         (["--tta"], five[..., :3])]:
        out = tmp_path / "_".join(extra or ["plain"])
        assert predict.main(base + [str(tmp_path / "five.tif"), "--out", str(out)] + extra) == 0
        image = np.ascontiguousarray(image)
        expected = predict.predict_mask(model, image, torch.float32, tta="--tta" in extra)
        assert np.array_equal(np.array(Image.open(out / "five_mask.png")), expected), extra
    assert predict.main(base + [str(tmp_path / "turned.tif"), "--out", str(tmp_path / "t")]) == 0
    mask = Image.open(tmp_path / "t" / "turned_mask.tif")
    assert mask.tag_v2[34264] == tuple(m) and 33922 not in mask.tag_v2


def test_training_with_bands_keeps_them_for_predict(tiny, tmp_path):
    root = tmp_path / "set"
    names, colours = layout.read_classes(tiny)
    _, images, masks = tile_masks(tiny, [1, 2], colours)
    for i, (image, mask) in enumerate(zip(images[:2], masks[:2])):
        (root / "images").mkdir(parents=True, exist_ok=True)
        write_tiff(root / "images" / f"{i}.tif", np.dstack([image[..., ::-1], image[..., :1]]))  # B, G, R, R
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.array(colours, np.uint8)[np.minimum(mask, 4)]).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text((tiny / "classes.json").read_text())
    train.main(tiny_args(root, tmp_path / "run", "--bands", "3,2,1", "--val-images", "1"))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["bands"] == [3, 2, 1]
    out = tmp_path / "out"
    args = ["--ckpt", str(tmp_path / "run" / "ckpt.pt"), str(root / "images" / "0.tif"), "--device", "cpu",
            "--precision", "fp32"]
    assert predict.main(args + ["--out", str(out)]) == 0  # the run's bands, unless --bands says otherwise
    assert predict.main(args + ["--out", str(tmp_path / "again"), "--bands", "3,2,1"]) == 0
    assert np.array_equal(np.array(Image.open(out / "0_mask.png")), np.array(Image.open(tmp_path / "again" /
                                                                                       "0_mask.png")))


def test_dense_masks_end_to_end_with_points_0(tiny, tmp_path, capsys):
    train.main(tiny_args(tiny, tmp_path / "run", "--points", "0"))
    said = capsys.readouterr().out
    _, _, masks = tile_masks(tiny, [1, 2], layout.read_classes(tiny)[1])
    labelled = sum(int((m != data.IGNORE).sum()) for m in masks)  # every pixel with a class
    assert f"({2 * 2 * 4} patches, {labelled} labelled pixels)" in said
    assert not (tmp_path / "run" / "points.csv").exists() and (tmp_path / "run" / "panel.png").exists()


def test_a_resumed_auto_run_keeps_the_precision_it_chose(mini, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speed, "bf16_possible", lambda device: True)
    timings = {torch.float32: 0.2, torch.bfloat16: 0.1}  # bf16 the faster when the run starts
    monkeypatch.setattr(speed, "time_network", lambda m, device, dtype, train, size: timings[dtype])
    args = tiny_args(mini, tmp_path / "run")[:-4]  # without its --precision and --device
    args += ["--patch", "32", "--device", "cpu", "--precision", "auto"]
    train.main(args)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["precision"] == "bf16"
    timings = {torch.float32: 0.1, torch.bfloat16: 0.2}  # a busy or another machine: fp32 now times faster
    capsys.readouterr()
    train.main(args + ["--resume", "--epochs", "2"])
    said = capsys.readouterr().out
    assert "precision: bf16, as the run being resumed chose" in said and "device cpu, bfloat16" in said


# ---------------------------------------------------------------------------- your own images and clicks


def centre_on_map(col, row, tie=(0.0, 0.0, 500000.0, 2800000.0), size=0.5):
    """Map x, y of the centre of pixel (col, row) of a GeoTIFF whose tie point (PixelIsArea) puts the
    raster corner position (i, j) at map (x, y): written out from the GeoTIFF specification."""
    i, j, x, y = tie
    return x + (col + 0.5 - i) * size, y - (row + 0.5 - j) * size


def feature(x, y, **properties):
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": properties}


def geojson(features, epsg=32640):
    crs = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    return json.dumps({"type": "FeatureCollection", "crs": crs, "features": features})


def test_a_click_on_a_pixel_centre_is_found_on_that_pixel(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    tie = (2.0, 3.0, 500100.0, 2800200.0)  # raster corner (2, 3) lies at this map point
    save_geotiff(tmp_path / "tags.tif", image, geotiff_tags(tie=tie))
    Image.fromarray(image).save(tmp_path / "world.png")
    (tmp_path / "world.pgw").write_text("2\n0\n0\n-2\n1000\n2000\n")  # pixel (0, 0): centre at (1000, 2000)
    info = {n: scene.image_info(tmp_path / n) for n in ["tags.tif", "world.png"]}
    x, y = centre_on_map(7, 4, tie)
    features = [feature(x, y, label="a"), feature(x + 0.24, y - 0.24, label="b"),  # half a pixel is 0.25
                feature(x + 0.26, y, label="c"), feature(1000 + 12 * 2, 2000 - 9 * 2, label="d"),
                feature(1000 + 12 * 2 - 0.99, 2000 - 9 * 2 + 0.99, label="e"), feature(0, 0, label="f")]
    (tmp_path / "clicks.geojson").write_text(geojson(features, epsg=32640))
    by_image, names = clicks.read_clicks([tmp_path / "clicks.geojson"], info)
    assert names == ["a", "b", "c", "d", "e"]  # f lies on no image
    assert by_image == {"tags.tif": [(7, 4, 0), (7, 4, 1), (8, 4, 2)], "world.png": [(12, 9, 3), (12, 9, 4)]}


@pytest.mark.parametrize("case, message", [
    ("not JSON", "not JSON"),
    ("not a FeatureCollection", "not a GeoJSON FeatureCollection"),
    ("a collection", "feature 1: a GeometryCollection, not a Point, LineString or Polygon"),
    ("another CRS, no pyproj", r"its points are in EPSG:4326, .*needs pyproj \(pip install pyproj\)"),
    ("a JSON list", "not a GeoJSON FeatureCollection .its top level is a list"),
    ("NaN coordinates", r"feature 0: coordinates \(nan, .*\) are not finite numbers"),
    ("infinite coordinates", r"feature 0: coordinates \(inf, .*\) are not finite numbers"),
    ("a crs without properties", "crs .* is not an EPSG code"),
    ("no class", r"feature 0: no class \(class or class_name or label or class_id"),
    ("a class not in classes.json", "feature 0: class 'Lava' is not in classes.json"),
    ("no point on an image", "no click on an image of the data set"),
    ("a CSV row with bad numbers", "clicks.csv:3: expected columns image,x,y,class with whole numbers"),
    ("a CSV row outside its image", r"clicks.csv:2: point \(40, 0\) is outside a.tif \(40x30\)"),
    ("a CSV row naming no image", "clicks.csv:2: unknown image 'b.tif'"),
    ("every class left empty", "clicks.csv:2: no click has a class yet"),
    ("an unclosed ring", r"feature 1: ring 0 of the Polygon is not closed: its first position \(5000"),
    ("empty coordinates", "feature 1: a MultiPolygon with empty coordinates"),
    ("a ring of 3 positions", "feature 1: ring 1 of polygon 0 of the MultiPolygon has 3 position.s.; a clo"),
    ("a line of 1 position", r"feature 1: line 1 of the MultiLineString has 1 position\(s\); a line needs 2"),
    ("a polygon on no image", "feature 1: the Polygon covers no pixel of any image"),
    ("a polygon of two rows", r"clicks.csv:3: a polygon of 2 row\(s\); it needs 3 positions at least"),
    ("a stroke of two classes", "clicks.csv:3: the rows of one stroke must name one image and one class"),
])
def test_bad_clicks_are_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, case, message):
    root = tmp_path / "scenes"
    root.mkdir()
    save_geotiff(root / "a.tif", np.zeros((30, 40, 3), np.uint8), geotiff_tags())
    x, y = centre_on_map(3, 3)
    features, classes = [feature(x, y, **{"class": "Water"})], None
    text = {"not JSON": "{nope", "not a FeatureCollection": json.dumps({"type": "Feature"}),
            "a collection": geojson(features + [{"type": "Feature", "properties": {"class": "Water"},
                                                 "geometry": {"type": "GeometryCollection"}}]),
            "another CRS, no pyproj": geojson(features, epsg=4326), "a JSON list": "[]",
            "NaN coordinates": geojson([feature(math.nan, y, **{"class": "Water"})]),
            "infinite coordinates": geojson([feature(math.inf, y, **{"class": "Water"})]),
            "a crs without properties": json.dumps({"type": "FeatureCollection", "features": features,
                                                    "crs": {"type": "name", "properties": None}}),
            "no class": geojson([feature(x, y, name="Water")]),
            "a class not in classes.json": geojson([feature(x, y, **{"class": "Lava"})]),
            "no point on an image": geojson([feature(0, 0, **{"class": "Water"})])}.get(case)
    square = [[x, y], [x + 2, y], [x + 2, y - 2], [x, y - 2], [x, y]]
    shape = {"an unclosed ring": ("Polygon", [square[:-1]]), "empty coordinates": ("MultiPolygon", []),
             "a ring of 3 positions": ("MultiPolygon", [[square, square[:2] + square[:1]]]),
             "a line of 1 position": ("MultiLineString", [square[:2], square[:1]]),
             "a polygon on no image": ("Polygon", [[[p[0] - 1000, p[1]] for p in square]])}.get(case)
    if shape:
        geometry = {"type": shape[0], "coordinates": shape[1]}
        text = geojson(features + [{"type": "Feature", "properties": {"class": "W"}, "geometry": geometry}])
    path = tmp_path / "clicks.geojson"
    if text is None:
        path = tmp_path / "clicks.csv"
        text = {"a CSV row with bad numbers": "image,x,y,class\na.tif,1,1,Water\na.tif,1.5,2,Water\n",
                "a CSV row outside its image": "image,x,y,class\na.tif,40,0,Water\n",
                "a CSV row naming no image": "image,x,y,class\nb.tif,1,1,Water\n",
                "every class left empty": "image,x,y,class\na.tif,1,1,\n",
                "a polygon of two rows": "image,x,y,class,polygon\na.tif,1,1,Water,\na.tif,2,2,Water,7\n"
                                         "a.tif,3,2,Water,7\n",
                "a stroke of two classes": "image,x,y,class,stroke\na.tif,1,1,W,1\na.tif,9,1,Sea,1\n"}[case]
    if case == "a class not in classes.json":
        classes = json.dumps({"classes": [{"title": "Water", "color": "#0000FF"}]})
        (root / "classes.json").write_text(classes)
    path.write_text(text)
    monkeypatch.setitem(sys.modules, "pyproj", None)  # as where it is not installed: import fails
    out = tmp_path / "run"
    assert command_line(train.main, tiny_args(root, out, "--point-labels", str(path))) == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])
    assert not out.exists()  # refused before anything is written, the folder included


def test_click_scores_on_a_handmade_case():
    truth = np.array([0, 0, 0, 0, 1, 1, 2, 3], np.uint8)  # eight clicks and what the map says there
    pred = np.array([0, 0, 0, 1, 1, 2, 2, 0], np.uint8)
    s = predict.click_scores(predict.confusion(truth, pred, 5), list("abcde"))
    assert s["click_accuracy"] == 5 / 8 and s["click_count"] == 8
    assert s["click_precision"] == {"a": 3 / 4, "b": 1 / 2, "c": 1 / 2, "d": None, "e": None}
    assert s["click_recall"] == {"a": 3 / 4, "b": 1 / 2, "c": 1.0, "d": 0.0, "e": None}
    f1 = {n: 2 * p * r / (p + r) for n, p, r in [("a", 3 / 4, 3 / 4), ("b", 1 / 2, 1 / 2), ("c", 1 / 2, 1)]}
    assert s["click_f1"] == pytest.approx({**f1, "d": 0.0, "e": None})  # d: clicked, never mapped


def test_suggested_clicks_are_the_least_sure_places_and_spread_out():
    margin = np.full((100, 120), 0.9, np.float32)
    margin[10, 10], margin[12, 14], margin[80, 100], margin[50, 60] = 0.1, 0.05, 0.2, 0.3
    margin[90:, :] = np.inf  # no data
    # (10, 10) is less sure than (100, 80) but too near (14, 12)
    assert predict.suggest_clicks(margin, 3, spacing=32) == [(14, 12), (100, 80), (60, 50)]
    picked = predict.suggest_clicks(np.random.default_rng(0).random((200, 200)), 30, spacing=20)
    assert len(picked) == 30
    pairs = [(a, b) for k, a in enumerate(picked) for b in picked[:k]]
    assert all((ax - bx) ** 2 + (ay - by) ** 2 >= 400 for (ax, ay), (bx, by) in pairs)


def scenes_and_clicks(tiny, root, per_image=15):
    """Three images of the tiny set without masks: two GeoTIFFs placed apart on the map, and one 16-bit
    TIFF with a world file. -> clicks drawn from the masks the folder does not have, as
    [(image name, x, y, class name)]."""
    names, colours = layout.read_classes(tiny)
    _, images, masks = tile_masks(tiny, [1, 2], colours)
    root.mkdir()
    ties = {"a.tif": (0.0, 0.0, 500000.0, 2800000.0), "b.tif": (0.0, 0.0, 500200.0, 2800000.0)}
    for name, image in zip(["a.tif", "b.tif"], images):
        save_geotiff(root / name, image, geotiff_tags(tie=ties[name]))
    write_tiff(root / "c.tif", images[2].astype(np.uint16) * 200 + 1000)
    (root / "c.tfw").write_text(f"0.5\n0\n0\n-0.5\n{501000.25}\n{2800000 - 0.25}\n")
    points = data.sample_points(masks[:3], 96, per_image, seed=3)[0]
    return [("abc"[i] + ".tif", x, y, names[c]) for i, x, y, c in points], ties


def test_own_images_and_clicks_train_predict_suggest_and_train_again(tiny, tmp_path, capsys):
    root = tmp_path / "scenes"
    rows, ties = scenes_and_clicks(tiny, root)
    lines = [f"{n},{x},{y},{c}\n" for n, x, y, c in rows]
    (tmp_path / "clicks.csv").write_text("image,x,y,class\n" + "".join(lines))
    world = {"c.tif": (501000.25, 2800000 - 0.25)}  # the centre of its top-left pixel
    mapped = [centre_on_map(x, y, ties[n]) if n in ties else (world[n][0] + x * 0.5, world[n][1] - y * 0.5)
              for n, x, y, _ in rows]
    (tmp_path / "clicks.geojson").write_text(geojson([feature(mx, my, label=c)
                                                      for (mx, my), (*_, c) in zip(mapped, rows)]))
    runs = []
    for clicks_file in ["clicks.csv", "clicks.geojson"]:
        runs.append(tmp_path / clicks_file.replace(".", "_"))
        train.main(tiny_args(root, runs[-1], "--point-labels", str(tmp_path / clicks_file), "--epochs", "2"))
    said = capsys.readouterr().out
    held = re.search(r"held out for validation \(--val-images 1\): (\S+)\n", said)  # a fifth, at least 1
    assert held and held.group(1) in ("a.tif", "b.tif", "c.tif")
    # the same clicks in pixels and on the map: the same points, the same loss table
    trained = [(r / "points.csv").read_text() for r in runs]
    assert trained[0] == trained[1] and held.group(1) not in trained[0]  # never trained on
    assert len(trained[0].splitlines()) == 1 + 2 * 15
    history = [json.loads((r / "metrics.json").read_text())["history"] for r in runs]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]
    last = history[0][-1]
    assert "miou" not in last and last["click_count"] == 15 and 0 <= last["click_accuracy"] <= 1
    classes = json.loads((runs[0] / "classes.json").read_text())["classes"]
    assert [c["title"] for c in classes] == sorted({c for *_, c in rows})  # the names in the clicks, sorted
    assert list(last["click_f1"]) == list(last["click_recall"]) == [c["title"] for c in classes]
    # map the folder, suggest where to click next, fill the suggestions in, train again
    out = tmp_path / "maps"
    ckpt = runs[1] / "ckpt.pt"
    args = ["--ckpt", str(ckpt), str(root), "--out", str(out), "--device", "cpu", "--precision", "fp32"]
    assert predict.main(args + ["--suggest", "4"]) == 0
    suggested = list(csv.DictReader(open(out / "suggestions.csv")))
    assert len(suggested) == 3 * 4 and all(r["class"] == "" for r in suggested)
    assert {r["hint"] for r in suggested} <= {c["title"] for c in classes}
    doc = json.loads((out / "suggestions.geojson").read_text())
    assert doc["crs"]["properties"]["name"].endswith("32640") and len(doc["features"]) == 3 * 4
    info = {n: scene.image_info(root / n) for n in ["a.tif", "b.tif", "c.tif"]}
    for f, r in zip(doc["features"], suggested):  # back from the map to the same pixel
        placed = [(n, size, geo["world"]) for n, (size, geo) in info.items()]
        pixel = (Path(r["image"]).name, int(r["x"]), int(r["y"]))
        assert clicks.locate(placed, *f["geometry"]["coordinates"]) == pixel
        f["properties"]["class"] = f["properties"]["hint"]  # the annotator fills the class in
    (out / "suggestions.geojson").write_text(json.dumps(doc))
    again = tmp_path / "again"
    train.main(tiny_args(root, again, "--point-labels", str(tmp_path / "clicks.geojson"),
                         str(out / "suggestions.geojson")))
    assert len((again / "points.csv").read_text().splitlines()) == 1 + 2 * 15 + 2 * 4


def test_partial_masks_and_scribbles_train_as_they_are_with_points_0(tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = {}
    for t in (1, 2):
        mask = np.zeros((64, 64, 3), np.uint8)  # black: a colour in no class, so no label
        mask[10:12, 5:50] = COLOURS[0]  # a scribble of class 0
        mask[40:44, 30:34] = COLOURS[2]  # a dab of class 2
        image = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
        files[f"Tile {t}/images/a.png"] = (image, Image.fromarray(mask))
    root = write_set(tmp_path / "set", classes_json(), files)
    train.main(tiny_args(root, tmp_path / "run", "--points", "0", "--val-tiles", "2"))
    said = capsys.readouterr().out
    assert "(1 patches, 106 labelled pixels)" in said  # 2 x 45 + 4 x 4 in the one training image
    assert not (tmp_path / "run" / "points.csv").exists()  # nothing drawn: the scribbles are the labels


# ---------------------------------------------------------------------------- drawn labels: lines, polygons


def inside_by_ray_casting(rings, w, h):
    """The reference for shapes.polygon_pixels, written another way: for every pixel centre (column i,
    row j at (i, j)) at once, the parity of the edges a ray to the right crosses, each edge tested by the
    sign of a cross product (no division), taking an edge's rows half-open as the scanline does."""
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    inside = np.zeros((h, w), bool)
    for ring in rings:
        for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:]):
            spans = (y1 <= rows) != (y2 <= rows)
            right = np.sign((x2 - x1) * (rows - y1) - (cols - x1) * (y2 - y1)) == np.sign(y2 - y1)
            inside ^= spans & right
    return inside


def as_mask(pixels, w, h):
    mask = np.zeros((h, w), bool)
    mask[pixels[1], pixels[0]] = True
    return mask


def test_a_polygon_labels_the_pixels_whose_centre_lies_inside_it_holes_and_half_pixels_included():
    rng = np.random.default_rng(0)
    w, h = 21, 17
    for k in range(300):  # rings on the pixel grid, on the half-pixel grid (centres on edges), anywhere
        rings = []
        for _ in range(rng.integers(1, 4)):  # an outer ring and holes, or rings that cross
            grids = [rng.integers(-3, 26, (6, 2)), rng.integers(-6, 50, (6, 2)) / 2,
                     rng.uniform(-3, 25, (6, 2))]
            corners = grids[k % 3][: rng.integers(3, 7)]
            rings.append(np.vstack([corners, corners[:1]]).astype(float))
        labelled = as_mask(shapes.polygon_pixels(rings, (w, h)), w, h)
        assert (labelled == inside_by_ray_casting(rings, w, h)).all()
    # GDAL's pixel corners (2, 2) to (7, 7) are (1.5, 1.5) to (6.5, 6.5) here: pixels 2 to 6, a hole 3 to 4
    square = lambda a, b: np.array([(a, a), (b, a), (b, b), (a, b), (a, a)], float)
    labelled = as_mask(shapes.polygon_pixels([square(1.5, 6.5), square(3.5, 5.5)[::-1]], (w, h)), w, h)
    expected = np.zeros((h, w), bool)
    expected[2:7, 2:7], expected[4:6, 4:6] = True, False
    assert (labelled == expected).all()
    # edges through pixel centres: in on the left and top, out on the right and bottom; two polygons
    # that share an edge share no pixel and leave none out
    expected[:] = False
    expected[2:6, 2:6] = True
    assert (as_mask(shapes.polygon_pixels([square(2, 6)], (w, h)), w, h) == expected).all()
    halves = [np.array(t, float) for t in
              [[(2, 2), (9, 2), (2, 9), (2, 2)], [(9, 2), (9, 9), (2, 9), (9, 2)]]]
    a, b = (as_mask(shapes.polygon_pixels([t], (w, h)), w, h) for t in halves)
    whole = as_mask(shapes.polygon_pixels([square(2, 9)], (w, h)), w, h)
    assert not (a & b).any() and ((a | b) == whole).all() and whole.sum() == 49
    # partly off the image: clipped; wholly off: nothing
    assert as_mask(shapes.polygon_pixels([square(-5.5, 3.5)], (w, h)), w, h).sum() == 16
    assert len(shapes.polygon_pixels([square(30, 40)], (w, h))[0]) == 0


def test_a_line_labels_the_pixels_within_half_its_width():
    w, h = 40, 30
    line = np.array([(5, 10), (20, 10)], float)  # along the centres of row 10
    expected = np.zeros((h, w), bool)
    expected[10, 5:21] = True  # width 1: the row, ends rounded by half a pixel (no more centre)
    assert (as_mask(shapes.line_pixels(line, 1, (w, h)), w, h) == expected).all()
    expected[9:12, 4:22] = True  # width 3: three rows, a pixel past each end (distance 1 and sqrt 2 <= 1.5)
    assert (as_mask(shapes.line_pixels(line, 3, (w, h)), w, h) == expected).all()
    diagonal = as_mask(shapes.line_pixels(np.array([(0, 0), (10, 10)], float), 1, (w, h)), w, h)
    assert (np.argwhere(diagonal) == [(k, k) for k in range(11)]).all()  # 8-connected, no corner cut
    rng = np.random.default_rng(1)
    for _ in range(50):  # against a distance computed case by case: before the start, past the end, along
        line, width = rng.uniform(-5, 45, (rng.integers(2, 6), 2)), rng.uniform(0.5, 6)
        rows, cols = np.mgrid[0:h, 0:w].astype(float)
        nearest = np.full((h, w), np.inf)
        for (x1, y1), (x2, y2) in zip(line[:-1], line[1:]):
            along = ((cols - x1) * (x2 - x1) + (rows - y1) * (y2 - y1)) / ((x2 - x1) ** 2 + (y2 - y1) ** 2)
            across = np.abs((x2 - x1) * (rows - y1) - (y2 - y1) * (cols - x1)) / np.hypot(x2 - x1, y2 - y1)
            d = np.where(along < 0, np.hypot(cols - x1, rows - y1),
                         np.where(along > 1, np.hypot(cols - x2, rows - y2), across))
            nearest = np.minimum(nearest, d)
        assert (as_mask(shapes.line_pixels(line, width, (w, h)), w, h) == (nearest <= width / 2)).all()


def test_labels_of_two_classes_on_one_pixel_leave_it_without_a_label(capsys):
    by_image = {"a": [(1, 1, 0), (1, 1, 0), (2, 2, 0), (3, 3, 1), (2, 2, 1), (2, 2, 0)],
                "b": [(5, 5, 2), (5, 5, 1)]}  # a point on a shape of another class, say
    assert shapes.one_class_per_pixel(by_image) == {"a": [(1, 1, 0), (3, 3, 1)]}
    assert "2 pixel(s) claimed by two classes or more are left without a label" in capsys.readouterr().out


def test_strokes_and_polygons_of_a_pixel_csv_in_any_column_order(tmp_path):
    info = {"a.png": ((40, 30), None)}
    rows = ["stroke,polygon,class,y,x,image", "1,,Water,10,5,a.png", "1,,Water,10.0,20,a.png",  # a stroke
            ",,Land,1,1,a.png",  # a point
            "1,,Water,20,30,a.png", "1,,Water,25,30,a.png", "1,,Water,40,30,a.png",  # another: apart
            ",4,Land,20,10,a.png", ",4,Land,20,14,a.png", ",4,Land,24,14,a.png", ",4,Land,24,10,a.png",
            "2,,Land,5,35,a.png"]  # a stroke of one row (a short drag on the page): a dot
    (tmp_path / "page.csv").write_text("\n".join(rows) + "\n")
    by_image, names = clicks.read_clicks([tmp_path / "page.csv"], info, line_width=1)
    expected = {(x, 10, 1) for x in range(5, 21)} | {(30, y, 1) for y in range(20, 30)} | {(1, 1, 0)}
    expected |= {(35, 5, 0)}
    expected |= {(x, y, 0) for x in range(10, 14) for y in range(20, 24)}  # a ring through pixel centres
    assert names == ["Land", "Water"] and sorted(by_image["a.png"]) == sorted(expected)


def qgis_layer(epsg=32640):
    """Features as QGIS exports a layer: a MultiPolygon with a hole and a Polygon overlapping it on a.tif,
    a MultiLineString along pixel centres on b.tif and, partly off it, on c.tif, and a Point on c.tif.
    -> (GeoJSON features, {(image, column, row, class)} expected for --line-width 1, pixels claimed twice)."""
    a = lambda i, j: [500000 + 0.5 * i, 2800000 - 0.5 * j]  # a.tif: GDAL's pixel corner (i, j) on the map
    b = lambda col, row: list(centre_on_map(col, row, (0.0, 0.0, 500200.0, 2800000.0)))
    c = lambda col, row: [501000.25 + 0.5 * col, 2800000 - 0.25 - 0.5 * row]  # c.tif's world file
    ring = lambda f, lo, hi: [f(lo, lo), f(hi, lo), f(hi, hi), f(lo, hi), f(lo, lo)]
    geometries = [("Water", "MultiPolygon", [[ring(a, 10, 30), ring(a, 15, 20)[::-1]]]),
                  ("Land", "Polygon", [ring(a, 25, 40)]),
                  ("Road", "MultiLineString", [[b(5, 40), b(30, 40)], [c(50, -20), c(50, 10)]]),
                  ("Building", "Point", c(60, 60))]
    features = [{"type": "Feature", "properties": {"fid": k + 1, "class": name},
                 "geometry": {"type": kind, "coordinates": coordinates}}
                for k, (name, kind, coordinates) in enumerate(geometries)]
    square = lambda lo, hi: {(i, j) for i in range(lo, hi) for j in range(lo, hi)}
    water, land = square(10, 30) - square(15, 20), square(25, 40)
    pixels = {("a.tif", i, j, "Water") for i, j in water - land}
    pixels |= {("a.tif", i, j, "Land") for i, j in land - water}
    pixels |= {("b.tif", i, 40, "Road") for i in range(5, 31)} | {("c.tif", 50, j, "Road") for j in range(11)}
    return features, pixels | {("c.tif", 60, 60, "Building")}, len(water & land)


def test_a_qgis_layer_of_polygons_lines_and_points_trains_maps_and_suggests(tiny, tmp_path, capsys):
    root = tmp_path / "scenes"
    scenes_and_clicks(tiny, root)
    features, expected, twice = qgis_layer()
    (tmp_path / "layer.geojson").write_text(geojson(features))
    run, out = tmp_path / "run", tmp_path / "maps"
    train.main(tiny_args(root, run, "--labels", str(tmp_path / "layer.geojson"), "--line-width", "1",
                         "--val-images", "0", "--patch", "32", "--batch-size", "32"))  # one step: 7 patches
    said = capsys.readouterr().out
    assert f"{twice} pixel(s) claimed by two classes or more are left without a label" in said
    classes = [c["title"] for c in json.loads((run / "classes.json").read_text())["classes"]]
    trained = {(r["image"], int(r["x"]), int(r["y"]), classes[int(r["class"])])
               for r in csv.DictReader(open(run / "points.csv"))}
    assert trained == expected and twice == 25
    assert predict.main(["--ckpt", str(run / "ckpt.pt"), str(root), "--out", str(out), "--suggest", "2",
                         "--device", "cpu", "--precision", "fp32"]) == 0
    assert len(json.loads((out / "suggestions.geojson").read_text())["features"]) == 3 * 2


@pytest.mark.skipif(importlib.util.find_spec("pyproj") is None, reason="needs pyproj: pip install pyproj")
def test_shapes_in_longitude_and_latitude_land_on_the_pixels_of_their_utm_vertices(tiny, tmp_path, capsys):
    import pyproj

    root = tmp_path / "scenes"
    scenes_and_clicks(tiny, root)
    info = {n: scene.image_info(root / n) for n in ["a.tif", "b.tif"]}  # c.tif's system is unknown
    features, _, _ = qgis_layer()
    (tmp_path / "utm.geojson").write_text(geojson(features))
    to_lonlat = pyproj.Transformer.from_crs("EPSG:32640", "EPSG:4326", always_xy=True)
    move = lambda c: list(to_lonlat.transform(*c)) if isinstance(c[0], float) else [move(p) for p in c]
    for f in features:
        f["geometry"]["coordinates"] = move(f["geometry"]["coordinates"])
    (tmp_path / "lonlat.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    utm = clicks.read_clicks([tmp_path / "utm.geojson"], info, line_width=1)
    assert clicks.read_clicks([tmp_path / "lonlat.geojson"], info, line_width=1) == utm  # RFC 7946: no crs
    assert "read as RFC 7946 GeoJSON" in capsys.readouterr().out


def test_bad_geometry_from_the_command_line_is_one_line_and_exit_code_2(tmp_path, capsys):
    root = tmp_path / "scenes"
    root.mkdir()
    save_geotiff(root / "a.tif", np.zeros((30, 40, 3), np.uint8), geotiff_tags())
    x, y = centre_on_map(3, 3)
    ring = {"type": "Polygon", "coordinates": [[[x, y], [x + 2, y], [x + 2, y - 2], [x, y - 1]]]}
    (tmp_path / "layer.geojson").write_text(geojson([{"type": "Feature", "properties": {"class": "W"},
                                                      "geometry": ring}]))
    args = tiny_args(root, tmp_path / "run", "--labels", str(tmp_path / "layer.geojson"))
    assert command_line(train.main, args) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "layer.geojson: feature 0: ring 0 of the Polygon is not closed" in said
    assert not (tmp_path / "run").exists()


def test_simulated_annotators_stay_in_one_class_and_spend_the_time_given(tiny, tmp_path, capsys):
    names, colours = layout.read_classes(tiny)
    files, _, masks = tile_masks(tiny, [1, 2], colours)
    info = {n: scene.image_info(tiny / n) for n in files}
    patches = sum((m[y : y + 32, x : x + 32] != data.IGNORE).any() for m in masks
                  for y in (0, 32, 64) for x in (0, 32, 64))  # the 32x32 grid patches with a class
    for kind, seconds in [("points", 2.4), ("strokes", 10.9), ("polygons", 14.4)]:
        out = tmp_path / f"{kind}.csv"
        simulate.main(["--data", str(tiny), "--tiles", "1,2", "--kind", kind, "--seconds", "30",
                       "--patch", "32", "--out", str(out), "--seed", "1"])
        said = capsys.readouterr().out
        rows = list(csv.DictReader(open(out)))
        labels = len(rows) if kind == "points" else len({r[kind[:-1]] for r in rows})
        budget = 30 * patches
        assert "0 found no place" in said and f"{labels} labels on {patches} patches" in said
        if kind == "points":  # 30 / 2.4 = 12.5: whole points per patch, those --points 12 draws
            assert labels == 12 * patches
            drawn = data.sample_points(masks, 32, 12, seed=1)[0]
            written = [(r["image"], int(r["x"]), int(r["y"])) for r in rows]
            assert written == [(files[i], x, y) for i, x, y, _ in drawn]
        else:
            assert budget - seconds < labels * seconds <= budget + 1e-6  # the leftover passes on
        by_image, _ = clicks.read_clicks([out], info, names, line_width=3)  # as train.py reads it
        for name, mask in zip(files, masks):
            xs, ys, cs = np.array(by_image[name]).T
            assert (mask[ys, xs] == cs).all()  # every labelled pixel has the mask's class
        pixels = sum(len(v) for v in shapes.one_class_per_pixel(by_image).values())
        assert f"{pixels} labelled pixels" in said
        if kind == "strokes":
            assert pixels > 10 * labels  # a stroke is many pixels


# ---------------------------------------------------------------------------- the click page


@contextlib.contextmanager
def serving(*args):
    """label.py with these arguments serving in a thread -> (base address, server)."""
    server = label.serve(label.get_args([*map(str, args), "--port", "0"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def label_server(tiny, tmp_path):
    """label.py serving two images of the tiny set (one cut to 90x60, so that x and y differ) with a
    clicks file and the tiny run's checkpoint -> (base address, clicks file, server)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    image = layout.read_image(tiny / "Tile 1" / "images" / "image_part_001.jpg")[0]
    Image.fromarray(image[:60, :90]).save(root / "sub" / "wide.png")
    Image.fromarray(image).save(root / "square.jpg")
    (root / "classes.json").write_text((tiny / "classes.json").read_text())
    points = tmp_path / "clicks.csv"
    with serving(root, "--points", points) as (base, server):
        yield base, points, server


def request(url, body=None, headers=None):
    """-> (status, body bytes) of a GET, or of a POST of `body` (bytes)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def change(base, server, click, **headers):
    """POST a click to /change as the page does (JSON, with the token), `headers` over those -> status."""
    page = {"Content-Type": "application/json", "X-Token": server.token}
    return request(base + "/change", json.dumps(click).encode(), {**page, **headers})[0]


def test_label_server_saves_reloads_and_refuses_bad_requests(label_server, tmp_path, capsys):
    base, points, server = label_server
    state = json.loads(request(base + "/state")[1])
    assert [i["name"] for i in state["images"]] == ["square.jpg", "sub/wide.png"]
    assert state["images"][1]["width"] == 90 and state["images"][1]["height"] == 60 and not state["model"]
    assert change(base, server, {"image": "sub/wide.png", "x": 80, "y": 5, "class": "Road"}) == 200
    assert points.read_text() == "image,x,y,class\nsub/wide.png,80,5,Road\n"  # saved at once
    # the file is what train.py reads
    info = {n: scene.image_info(server.labels.root / n) for n in ["square.jpg", "sub/wide.png"]}
    assert clicks.read_clicks([points], info, layout.read_classes(server.labels.root)[0])[0] == \
        {"sub/wide.png": [(80, 5, 2)]}
    capsys.readouterr()
    bad = [("/../classes.json", None), ("/image/..%2F..%2Fclasses.json", None), ("/image/%2e%2e", None),
           ("/%2e%2e/%2e%2e/etc/passwd", None), ("//etc/passwd", None), ("/image/2", None),
           ("/image/-1", None),
           ("/map/0", None), ("/change", b"{not json"),  # /map: no model here
           ("/change", b'{"image": "sub/wide.png", "x": 90, "y": 0, "class": "Road"}'),
           ("/change", b'{"image": "../x.png", "x": 1, "y": 1, "class": "Road"}'),
           ("/change", b'{"image": "sub/wide.png", "x": 1.5, "y": 1, "class": "Road"}'),
           ("/change", b'{"image": "sub/wide.png", "x": 1, "y": 1, "class": "Lava"}'), ("/change", b"[1, 2]")]
    for path, body in bad:
        status, _ = request(base + path, body, {"Content-Type": "application/json", "X-Token": server.token})
        assert (status == 404) if body is None else (status == 400), (path, status)
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == len(bad) and "Traceback" not in "".join(log)  # one line each
    assert points.read_text() == "image,x,y,class\nsub/wide.png,80,5,Road\n"  # untouched by them
    # two tabs at once: every change lands, and the file is always whole
    def tab(k):
        for y in range(10):
            change(base, server, {"image": "square.jpg", "x": k, "y": y, "class": "Water"})

    tabs = [threading.Thread(target=tab, args=(k,)) for k in range(4)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    rows = list(csv.DictReader(open(points)))
    assert len(rows) == 41
    assert {(int(r["x"]), int(r["y"])) for r in rows[1:]} == {(k, y) for k in range(4) for y in range(10)}
    # a click on a point removes it; a new server (a reload) shows what was saved
    change(base, server, {"image": "sub/wide.png", "x": 80, "y": 5})
    again = label.Labels(server.labels.root, points, None, None, 3)
    assert len(again.clicks()) == 40 and ("sub/wide.png", 80, 5) not in [r[:3] for r in again.rows]
    named = label.Labels(server.labels.root, tmp_path / "new.csv", "Water, Land,Road", None, 3)
    assert named.names == ["Land", "Road", "Water"] and named.clicks() == []  # sorted, as train.py sorts them


def test_label_server_saves_checks_and_removes_strokes(label_server, tmp_path, capsys):
    base, points, server = label_server
    assert change(base, server, {"image": "sub/wide.png", "x": 3, "y": 4, "class": "Road"}) == 200
    assert points.read_text() == "image,x,y,class\nsub/wide.png,3,4,Road\n"  # no stroke yet, no column
    line = [[3, 4], [5, 4], [7, 5], [89, 59]]  # its first vertex where the point is: each stays its own
    assert change(base, server, {"image": "sub/wide.png", "stroke": line, "class": "Water"}) == 200
    stroke = "".join(f"sub/wide.png,{x},{y},Water,1\n" for x, y in line)
    saved = "image,x,y,class,stroke\nsub/wide.png,3,4,Road,\n" + stroke
    assert points.read_text() == saved
    capsys.readouterr()
    many = [[i % 90, i // 90] for i in range(label.VERTICES + 1)]
    bad = [{"image": "sub/wide.png", "stroke": [[3, 4], [90, 0]], "class": "Water"},  # off the image
           {"image": "sub/wide.png", "stroke": [[3, 4], [-1, 0]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4], [5.5, 0]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4], [True, 0]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4, 5]], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [], "class": "Water"},
           {"image": "sub/wide.png", "stroke": [[3, 4]], "class": "Lava"},  # no such class
           {"image": "sub/wide.png", "stroke": [[3, 4]], "class": ""},
           {"image": "sub/wide.png", "stroke": many, "class": "Water"},  # too many vertices
           {"image": "sub/wide.png", "stroke": [[3, 4]]},  # a removal names a number
           {"image": "nowhere.png", "stroke": [[3, 4]], "class": "Water"}]
    assert [change(base, server, b) for b in bad] == [400] * len(bad)
    huge = {"image": "sub/wide.png", "stroke": [[10, 10]] * 30_000, "class": "Water"}  # over 256 kB
    assert change(base, server, huge) == 413
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == len(bad) + 1 and "Traceback" not in "".join(log)  # one line each
    assert points.read_text() == saved  # untouched by them
    # a click on the point at the stroke's first vertex removes the point only; a second stroke is number 2
    assert change(base, server, {"image": "sub/wide.png", "x": 3, "y": 4}) == 200
    assert change(base, server, {"image": "square.jpg", "stroke": [[1, 1], [2, 2]], "class": "Road"}) == 200
    assert points.read_text() == "image,x,y,class,stroke\n" + stroke + \
        "square.jpg,1,1,Road,2\nsquare.jpg,2,2,Road,2\n"
    state = json.loads(request(base + "/state")[1])  # what a reload shows: the file, read another way
    assert state["clicks"] == [] and state["strokes"] == [
        {"image": "sub/wide.png", "stroke": 1, "class": "Water", "points": line},
        {"image": "square.jpg", "stroke": 2, "class": "Road", "points": [[1, 1], [2, 2]]}]
    assert change(base, server, {"image": "sub/wide.png", "stroke": 2}) == 200  # not this image's: kept
    assert change(base, server, {"image": "square.jpg", "stroke": 2}) == 200
    assert points.read_text() == "image,x,y,class,stroke\n" + stroke  # the column stays
    # read back: a stroke's rows are consecutive, of one class; its number whole; blind mode takes none
    root = server.labels.root
    for rows, said in [("a,1,1,Water,1\na,2,2,Water,\na,3,3,Water,1\n", "stroke 1 again"),
                       ("a,1,1,Water,1\na,2,2,Road,1\n", "stroke 1 again"),
                       ("a,1,1,Water,x\n", "stroke 'x': a stroke is a whole number"),
                       ("a,1,1,,3\n", "stroke '3': a stroke is a whole number from 0, with a class")]:
        (tmp_path / "bad.csv").write_text("image,x,y,class,stroke\n" + rows.replace("a,", "square.jpg,"))
        with pytest.raises(DataError, match=re.escape(said)):
            label.Labels(root, tmp_path / "bad.csv", None, None, 3)
    (tmp_path / "sample.csv").write_text("image,x,y,class,sample\nsquare.jpg,1,1,,1\n")
    with pytest.raises(ValueError, match="blind mode: a sample is points"):
        label.Labels(root, tmp_path / "sample.csv", None, None, 3).change(bad[0] | {"stroke": [[1, 1]]})


def test_label_server_takes_changes_only_from_its_own_page(label_server, capsys):
    base, points, server = label_server
    port, token = server.server_address[1], server.token
    click = {"image": "square.jpg", "x": 1, "y": 2, "class": "Water"}
    capsys.readouterr()
    writes = [{"Content-Type": "text/plain"},  # what a <form enctype="text/plain"> of another page sends
              {"Content-Type": "application/x-www-form-urlencoded"}, {"X-Token": ""}, {"X-Token": token[:-1]},
              {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another site
              {"Origin": "null"},  # a local file
              {"Origin": f"http://evil.example:{port}"},
              {"Host": f"evil.example:{port}"}]  # DNS rebinding: our address under the attacker's name
    reads = [("/state", {"Host": f"evil.example:{port}"}), ("/image/0", {"Host": f"evil.example:{port}"}),
             ("/", {"Host": f"127.0.0.1:{port + 1}"}), ("/state", {"Host": "127.0.0.1"}),
             ("/state", {"Origin": "http://evil.example"})]
    assert [change(base, server, click, **h) for h in writes] == [403] * len(writes)
    assert [request(base + path, None, h)[0] for path, h in reads] == [403] * len(reads)
    log = capsys.readouterr().err.splitlines()
    assert len(log) == len(writes) + len(reads) and all("403, message refused: " in line for line in log)
    assert not points.exists()  # nothing written
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}"]:
        assert request(base + "/state", None, {"Host": host})[0] == 200, host
    assert change(base, server, click, Origin=f"http://localhost:{port}") == 200
    assert points.read_text() == "image,x,y,class\nsquare.jpg,1,2,Water\n"
    # on every address: a warning, and any IP address is ours, a name still is not
    everywhere = label.serve(label.get_args([str(server.labels.root), "--points", str(points),
                                             "--host", "0.0.0.0", "--port", "0"]))
    port = everywhere.server_address[1]
    assert capsys.readouterr().out == f"warning: --host 0.0.0.0: anyone who can reach port {port} can read " \
        "the images and, with the token, write clicks\n"
    addresses = [f"10.1.2.3:{port}", f"localhost:{port}", f"evil.example:{port}", f"10.1.2.3:{port + 1}"]
    assert [label_guard.ours(a, everywhere) for a in addresses] == [True, True, False, False]
    everywhere.server_close()


def test_label_server_writes_back_every_row_and_column(label_server, tmp_path):
    root = label_server[2].labels.root
    # predict.py's suggestions: images as given to it, the class empty, the model's hint and margin
    rows = [(str(root / "square.jpg"), 5, 6, 0, 0.01), (str(root / "sub/wide.png"), 7, 8, 1, 0.02),
            (str(root / "square.jpg"), 9, 10, 2, 0.03), (str(root / "sub/wide.png"), 11, 12, 0, 0.5)]
    given = clicks.write_suggestions(tmp_path, rows, ["Water", "Road", "Building"], {})[0]
    before = given.read_bytes().splitlines(keepends=True)
    labels = label.Labels(root, given, None, None, 3)
    assert [(c["x"], c["class"]) for c in labels.clicks()] == [(5, ""), (7, ""), (9, ""), (11, "")]  # shown
    labels.change({"image": "sub/wide.png", "x": 7, "y": 8, "class": "Water"})  # fills its row in
    labels.change({"image": "square.jpg", "x": 9, "y": 10})  # removes its row
    labels.change({"image": "sub/wide.png", "x": 1, "y": 2, "class": "Road"})  # a new row, the rest empty
    expected = [*before[:2], before[2].replace(b",7,8,,", b",7,8,Water,"), before[4],
                b"sub/wide.png,1,2,Road,,\r\n"]
    assert given.read_bytes() == b"".join(expected)
    info = {n: scene.image_info(root / n) for n in ["square.jpg", "sub/wide.png"]}
    assert clicks.read_clicks([given], info, labels.names)[0] == {"sub/wide.png": [(7, 8, 0), (1, 2, 2)]}
    # Excel's "CSV UTF-8" (a byte-order mark), "\n" line ends, ';' with 'Image' (Excel where the comma is
    # the decimal mark) and "Unicode text" (UTF-16, tabs) are written back as they were, a stroke too
    for text, added, first, encoding in [
            ("\ufeffimage,x,y,class,note\r\nsquare.jpg,3,4,Water,\"a, b\"\r\n",
             "square.jpg,3,5,Building,\r\n", "Water", "utf-8"),
            ("image,x,y,class\nsquare.jpg,3,4,2\n", "square.jpg,3,5,Building\n", "Road", "utf-8"),
            ("Image;X;Y;Class\r\nsquare.jpg;3;4;Water\r\n", "square.jpg;3;5;Building\r\n", "Water", "utf-8"),
            ("image\tx\ty\tclass\r\nsquare.jpg\t3\t4\tWater\r\n", "square.jpg\t3\t5\tBuilding\r\n", "Water",
             "utf-16")]:
        path = tmp_path / "excel.csv"
        path.write_bytes(text.encode(encoding))
        labels = label.Labels(root, path, None, None, 3)
        assert labels.clicks() == [{"image": "square.jpg", "x": 3, "y": 4, "class": first}]  # 2: class 2
        labels.change({"image": "square.jpg", "x": 3, "y": 5, "class": "Building"})
        assert path.read_bytes() == (text + added).encode(encoding)
    labels.change({"image": "square.jpg", "stroke": [[1, 1], [1, 3]], "class": "Road"})
    header, *_, last = path.read_bytes().decode("utf-16").splitlines()
    assert header == "image\tx\ty\tclass\tstroke" and last == "square.jpg\t1\t3\tRoad\t1"
    assert clicks.read_clicks([path], info, labels.names)[0]["square.jpg"][:2] == [(3, 4, 0), (3, 5, 3)]
    # GeoJSON is refused at start, whatever its name: the page writes CSV
    for name, text in [("points.csv", '{"type": "FeatureCollection", "features": []}'),
                       ("p.geojson", "\n [ ]\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: GeoJSON, and the page reads and writes CSV") as e:
            label.Labels(root, tmp_path / name, None, None, 3)
        assert "\n" not in str(e.value) and (tmp_path / name).read_text() == text


def test_label_server_on_a_full_disk_keeps_what_is_saved(label_server, monkeypatch, capsys):
    base, points, server = label_server
    first = {"image": "square.jpg", "x": 1, "y": 2, "class": "Water"}
    assert change(base, server, first) == 200
    saved = points.read_bytes()

    def full(handle):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert change(base, server, {"image": "square.jpg", "x": 3, "y": 4, "class": "Building"}) == 507
    log = capsys.readouterr().err.splitlines()
    assert len(log) == 1 and "507, message not saved: No space left on device" in log[0]
    assert points.read_bytes() == saved
    assert [p.name for p in points.parent.iterdir() if p.name.startswith(points.name)] == [points.name]
    assert json.loads(request(base + "/state")[1])["clicks"] == [first]  # as a reload shows: what is on disk
    monkeypatch.undo()
    assert change(base, server, {"image": "square.jpg", "x": 5, "y": 6, "class": "Building"}) == 200
    assert points.read_text() == "image,x,y,class\nsquare.jpg,1,2,Water\nsquare.jpg,5,6,Building\n"


def test_label_server_answers_requests_it_does_not_expect_with_a_4xx(label_server, tmp_path, capsys):
    base, points, server = label_server
    port, click = server.server_address[1], b'{"image": "square.jpg", "x": 1, "y": 2, "class": "Water"}'
    head = f"POST /change HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n" \
           f"X-Token: {server.token}\r\n"
    sent = [(head + "Content-Length: -1\r\n", click + b" " * 20_000, 400),  # else read to the end: 20 kB
            (head + "Content-Length: 58a\r\n", click, 400), (head, click, 411),
            (head + "Content-Length: 10000\r\n", b"[" * 5000 + b"]" * 5000, 400),  # too deep for json
            (head + "Content-Length: 63\r\n", click.replace(b"Water", "水".encode()), 400),  # not Latin-1
            (f"GET /image/\xb2 HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n", b"", 400),  # '²'.isdigit()
            ("GET /state HTTP/1.0\r\n", b"", 403)]  # no Host
    capsys.readouterr()
    for text, body, status in sent:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(text.encode("latin-1") + b"\r\n" + body)
            with contextlib.suppress(OSError):  # the server may have answered and closed already
                s.shutdown(socket.SHUT_WR)
            reply = s.makefile("rb").readline()
        assert reply.startswith(f"HTTP/1.0 {status} ".encode()), (text, body[:20], reply)
    log = capsys.readouterr().err.splitlines()
    assert len(log) == len(sent) and "Traceback" not in "".join(log)  # one line each
    assert not points.exists() and request(base + "/state")[0] == 200  # nothing saved, and still serving
    # a link planted where a fixed temporary file would be is not followed; the file keeps its mode
    victim, kept = tmp_path / "victim.txt", tmp_path / "kept.csv"
    victim.write_text("mine")
    kept.write_text("image,x,y,class\n")
    kept.chmod(0o640)
    (tmp_path / "kept.csv.tmp").symlink_to(victim)
    label.Labels(server.labels.root, kept, None, None, 3).change(json.loads(click))
    assert victim.read_text() == "mine" and kept.read_text() == "image,x,y,class\nsquare.jpg,1,2,Water\n"
    assert kept.stat().st_mode & 0o777 == 0o640 and not kept.is_symlink()
    # bad flag values: one line each, before anything starts
    start = [str(server.labels.root), "--points", str(kept), "--port", "0"]
    for flags, said in [(["--suggest", "-5"], "--suggest -5: "), (["--classes", " , "], "--classes ' , ': ")]:
        with pytest.raises(DataError, match=re.escape(said)) as e:
            label.serve(label.get_args(start + flags))
        assert "\n" not in str(e.value)


def test_label_blind_mode_shows_and_takes_the_sample_points_only(label_server, tiny_run, tmp_path, capsys):
    root = label_server[2].labels.root
    sample = tmp_path / "sample.csv"  # assess.py's: images as given to predict.py, the class empty
    text = f"image,x,y,class,sample\r\n{root / 'sub/wide.png'},80,5,,1\r\n{root / 'square.jpg'},3,4,,2\r\n"
    sample.write_bytes(text.encode())
    with serving(root, "--points", sample, "--ckpt", tiny_run[1] / "ckpt.pt") as (base, server):
        assert "ignored" in capsys.readouterr().out  # the map would tell the person what to answer
        state = json.loads(request(base + "/state")[1])
        assert state["blind"] and not state["model"]
        assert state["clicks"] == [{"image": "sub/wide.png", "x": 80, "y": 5, "class": "", "sample": 1},
                                   {"image": "square.jpg", "x": 3, "y": 4, "class": "", "sample": 2}]
        assert request(base + "/map/0")[0] != 200 and request(base + "/suggestions/0")[0] != 200
        assert change(base, server, {"image": "square.jpg", "x": 9, "y": 9, "class": "Road"}) == 400  # off it
        assert change(base, server, {"image": "square.jpg", "x": 3, "y": 4}) == 400  # none removed
        assert sample.read_bytes() == text.encode()
        assert change(base, server, {"image": "square.jpg", "x": 3, "y": 4, "class": "Road"}) == 200
    assert sample.read_bytes() == text.replace(",3,4,,2", ",3,4,Road,2").encode()


def chromium_missing():
    return importlib.util.find_spec("playwright") is None or not Path("/usr/bin/chromium").exists()


BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the browser tests of this file (each launch costs seconds)."""
    if chromium_missing():
        pytest.skip("needs Chromium and Playwright: apt-get install -y chromium && pip install playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_FLAGS)
        yield browser
        browser.close()


def open_label_page(browser, address, image=0, size=(900, 700)):
    """A new tab on label.py's page at `address`, showing image number `image` -> the page."""
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.goto(address)
    page.wait_for_function("S && picture.complete && picture.naturalWidth")
    for _ in range(image):
        page.keyboard.press("n")
    page.wait_for_function(f"cur === {image} && picture.complete && picture.naturalWidth")
    return page


def screenshot(browser, address, path, image=0, size=(900, 700)):
    """A screenshot of the page on image number `image`, with the model's map (key m) and its
    suggestions when the server has a model."""
    page = open_label_page(browser, address, image, size)
    if page.evaluate("S.model"):
        page.keyboard.press("m")
        page.wait_for_function("overlay !== null && suggestions.length > 0")
    page.screenshot(path=path)
    page.close()


def label_page_screenshot(base, path, image=0, size=(900, 700)):
    """screenshot() in a browser of its own (figures.py takes README's picture with it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        screenshot(p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_FLAGS), base, path,
                   image, size)


def click_on_the_page(page):
    """Press 3, click the canvas twice at one place (add, then remove) -> dict: box, the client
    position clicked, toImage there, nearest() near and far from the point, the clicks after the add."""
    seen = {}
    page.keyboard.press("3")
    box = page.locator("canvas").bounding_box()
    seen["box"], scale = box, box["width"] / 90  # CSS pixels per image pixel
    # 2 CSS pixels right of and below the centre of image pixel (54, 16)
    at = seen["at"] = (box["x"] + 54.5 * scale + 2, box["y"] + 16.5 * scale + 2)
    seen["toImage"] = page.evaluate(f"toImage({at[0]}, {at[1]})")
    page.mouse.click(*at)
    page.wait_for_function("S.clicks.length === 1")
    seen["nearest"] = [page.evaluate(f"nearest(here(), {at[0] + d}, {at[1] - d})") for d in (2, 9)]
    seen["after add"] = page.evaluate("S.clicks")
    page.mouse.click(*at)
    page.wait_for_function("S.clicks.length === 0")
    return seen


# another site's page: a form posting text/plain that reads as JSON, and a no-cors fetch
ATTACK = """<!doctype html><form method="post" enctype="text/plain" action="{base}/change">
<input name='{{"image": "square.jpg", "x": 7, "y": 7, "class": "Water", "pad": "' value='"}}'></form>
<script>fetch("{base}/change", {{mode: "no-cors", method: "POST",
  body: '{{"image": "square.jpg", "x": 8, "y": 8, "class": "Water"}}'}})
  .finally(() => document.forms[0].submit());
</script>"""


def test_label_page_in_a_browser_saves_its_own_clicks_only(chromium, label_server, tmp_path, monkeypatch,
                                                            capsys):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    base, points, server = label_server

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            page = ATTACK.format(base=base).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    other = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    tab = chromium.new_page()
    tab.goto(f"http://127.0.0.1:{other.server_address[1]}/")
    tab.wait_for_url(base + "/change")  # the form was sent, after the fetch
    other.shutdown()
    other.server_close()
    tab.close()
    refused = [line for line in capsys.readouterr().err.splitlines() if '"POST /change' in line]
    assert len(refused) == 2 and all("403, message refused: " in line for line in refused)
    assert not points.exists()
    # the page itself: the right pixel, saved
    page = open_label_page(chromium, f"{base}/#token={server.token}", image=1)  # the second image: 90x60
    seen = click_on_the_page(page)
    box, (cx, cy) = seen["box"], seen["at"]
    # the reference: the canvas box is the whole 90x60 image, so a client position maps proportionally
    x, y = math.floor((cx - box["x"]) * 90 / box["width"]), math.floor((cy - box["y"]) * 60 / box["height"])
    assert abs(box["width"] / box["height"] - 90 / 60) < 0.02  # the box has the image's shape
    assert seen["toImage"] == {"x": x, "y": y} and (x, y) == (54, 16)
    assert seen["after add"] == [{"image": "sub/wide.png", "x": x, "y": y, "class": "Road"}]  # key 3: class 2
    assert seen["nearest"] == [seen["after add"][0], None]  # 4 CSS pixels from the point, and 11
    assert points.read_text() == "image,x,y,class\n"  # the second click removed it
    # a full disk: the page says so, and shows what the file holds
    monkeypatch.setattr(os, "fsync", lambda handle: exec("raise OSError(28, 'No space left on device')"))
    page.mouse.click(cx, cy)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('not saved: 507')")
    assert page.evaluate("S.clicks") == [] and points.read_text() == "image,x,y,class\n"
    monkeypatch.undo()
    page.close()
    screenshot(chromium, base + "/", tmp_path / "page.png", image=1)  # as README's picture is taken
    assert Image.open(tmp_path / "page.png").size == (900, 700)


def colour_between(page, a, b):
    """The colour ('#RRGGBB') the page's canvas shows halfway between the centres of image pixels a and b."""
    rgb = page.evaluate("""([x, y]) => { const d = window.devicePixelRatio || 1, c = toCanvas(x, y);
        return [...ctx.getImageData(Math.round(c.x * d), Math.round(c.y * d), 1, 1).data]; }""",
                        [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2])
    return "#%02X%02X%02X" % tuple(rgb[:3])


def test_label_page_in_a_browser_draws_saves_and_removes_strokes(chromium, label_server):
    base, points, server = label_server
    page = open_label_page(chromium, f"{base}/#token={server.token}", image=1)  # sub/wide.png, 90x60
    page.keyboard.press("2")
    name, colour = page.evaluate("[S.classes[1].name, S.classes[1].colour]")
    box = page.locator("canvas").bounding_box()
    scale = box["width"] / 90  # CSS pixels per image pixel
    client = lambda x, y: (box["x"] + x * scale, box["y"] + y * scale)  # noqa: E731
    pixel = lambda cx, cy: (math.floor((cx - box["x"]) / scale), math.floor((cy - box["y"]) / scale))  # noqa
    start, end = client(10.3, 20.6), client(70.8, 41.2)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=25)
    drawing = page.evaluate("down.path.map(p => [p.x, p.y])")
    assert colour_between(page, *drawing[4:6]) == colour  # drawn as it is drawn
    page.mouse.up()
    page.wait_for_function("S.strokes.length === 1")
    rows = list(csv.DictReader(open(points)))
    assert open(points).readline() == "image,x,y,class,stroke\n" and page.evaluate("S.clicks") == []
    assert {(r["image"], r["class"], r["stroke"]) for r in rows} == {("sub/wide.png", name, "1")}
    xy = [(int(r["x"]), int(r["y"])) for r in rows]
    assert xy[0] == pixel(*start) == (10, 20) and xy[-1] == pixel(*end) == (70, 41)  # where the drag was
    (x0, y0), (x1, y1) = xy[0], xy[-1]
    for x, y in xy:  # each vertex a pixel the straight drag crossed: within a pixel of its line
        assert abs((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) / math.hypot(x1 - x0, y1 - y0) < 1.5
    steps = [math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(xy, xy[1:])]
    assert len(xy) >= 10 and min(steps[:-1]) >= 2 and all(b[0] > a[0] for a, b in zip(xy, xy[1:]))
    # a reload shows it, drawn in its class colour
    page.reload()
    page.wait_for_function("S && picture.complete && picture.naturalWidth")
    page.keyboard.press("n")
    page.wait_for_function("cur === 1 && picture.complete && picture.naturalWidth")
    assert page.evaluate("S.strokes") == [{"image": "sub/wide.png", "stroke": 1, "class": name,
                                           "points": [list(p) for p in xy]}]
    assert [list(p) for p in xy[:len(drawing)]] == drawing and len(xy) - len(drawing) <= 1  # + the release's
    assert colour_between(page, *xy[4:6]) == colour
    # a click near the line, between its vertices, removes the whole stroke; a click elsewhere adds a point
    page.mouse.click(*client((xy[4][0] + xy[5][0]) / 2 + 0.5, (xy[4][1] + xy[5][1]) / 2 + 0.5))
    page.wait_for_function("S.strokes.length === 0")
    assert points.read_text() == "image,x,y,class,stroke\n"
    page.keyboard.press("2")  # a reload chose the first class again
    page.mouse.click(*client(30.5, 5.5))
    page.wait_for_function("S.clicks.length === 1")
    assert points.read_text() == f"image,x,y,class,stroke\nsub/wide.png,30,5,{name},\n"
    # a drag out of the image ends its stroke at the edge: no vertex off the image, none along the edge
    page.mouse.move(*client(80.5, 30.5))
    page.mouse.down()
    page.mouse.move(*client(100.5, 30.5), steps=10)
    page.mouse.move(*client(100.5, 10.5), steps=5)
    page.mouse.up()
    page.wait_for_function("S.strokes.length === 1")
    assert page.evaluate("S.strokes[0].points") == [[x, 30] for x in (80, 82, 84, 86, 88)]
    # shift-drag pans: no stroke
    page.keyboard.down("Shift")
    page.mouse.move(*client(50, 50))
    page.mouse.down()
    page.mouse.move(*client(60, 50), steps=3)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.evaluate("view.panX") == pytest.approx(10 * scale, abs=1)
    assert page.evaluate("S.strokes.length") == 1
    page.close()


def test_label_page_in_a_browser_blind_mode_labels_point_after_point(chromium, label_server, tmp_path):
    root = label_server[2].labels.root
    sample = tmp_path / "sample.csv"  # the rows out of the sample's order
    sample.write_text("image,x,y,class,sample\nsub/wide.png,80,5,,2\nsquare.jpg,10,20,,1\n"
                      "square.jpg,50,60,,3\n")
    with serving(root, "--points", sample) as (base, server):
        page, asked = chromium.new_page(viewport={"width": 900, "height": 700}), []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(f"{base}/#token={server.token}")
        page.wait_for_function("S && k === 0 && cur === 0 && picture.complete && picture.naturalWidth")
        at, box = page.evaluate("[toCanvas(10, 20), canvas.getBoundingClientRect()]")  # point 1, centred
        assert abs(at["x"] - box["width"] / 2) < 1 and abs(at["y"] - box["height"] / 2) < 1
        page.keyboard.press("3")  # Road
        page.wait_for_function("k === 1 && cur === 1 && picture.complete")  # on to sample point 2
        assert "1 of 3 labelled" in page.text_content("#title")
        page.keyboard.press("m")
        box = page.locator("canvas").bounding_box()
        page.mouse.click(box["x"] + 5, box["y"] + 5)  # elsewhere: adds nothing
        page.keyboard.press("n")
        page.wait_for_function("k === 2")
        assert not page.evaluate("showMap") and page.evaluate("S.clicks.length") == 3
        assert "probability sample" in page.text_content("#help")
        page.close()
    assert [u for u in asked if "/map" in u or "/suggestions" in u or "/change" in u] == [base + "/change"]
    assert sample.read_text() == "image,x,y,class,sample\nsub/wide.png,80,5,,2\nsquare.jpg,10,20,Road,1\n" \
        "square.jpg,50,60,,3\n"
# ---------------------------------------------------------------------------- accuracy and area from a sample


# Olofsson et al. (2014), section 5, Table 8: sample counts, rows = map class, columns = reference class
PAPER_CLASSES = ["deforestation", "forest gain", "stable forest", "stable non-forest"]
PAPER_COUNTS = [[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]]
PAPER_PIXELS = [200_000, 150_000, 3_200_000, 6_450_000]  # mapped, 30 m pixels of 0.09 ha


def test_accuracy_and_area_give_the_figures_of_olofsson_2014_section_5():
    r = assess.stratified(PAPER_COUNTS, PAPER_PIXELS)
    hectares = sum(PAPER_PIXELS) * 0.09
    assert round(r["overall"], 2) == 0.95
    assert np.round(r["users"], 2).tolist() == [0.88, 0.73, 0.93, 0.96]
    assert np.round(r["producers"], 2).tolist() == [0.75, 0.85, 0.93, 0.96]
    assert PAPER_PIXELS[0] * 0.09 == 18_000 and round(r["area"][0] * hectares) == 21_158
    # the 95% half-width of the deforestation area by eqs. 10-11 is 6,157.6 ha: 6,157 cut to whole
    # hectares, 6,158 rounded (docs/accuracy.md)
    half = assess.Z95 * r["area_se"][0] * hectares
    assert int(half) == 6_157 and round(half) == 6_158
    assert r["area"].sum() == pytest.approx(1) and r["matrix"].sum() == pytest.approx(1)


def stratified_by_points(counts, mapped):
    """The estimates of Olofsson et al. written differently: every point of stratum h stands for N_h / n_h
    pixels (the inverse of its chance to be drawn); each figure is a ratio of two such weighted sums of 0/1
    indicators, R = Y / X, with the variance of a stratified ratio estimator (Cochran 1977, 6.2 and 5.3,
    no finite population correction): V(R) = sum_h N_h^2 s_h^2(y - R x) / n_h / X^2."""
    counts, N = np.asarray(counts), np.asarray(mapped, float)
    cells = [(i, j) for i in range(len(counts)) for j in range(len(counts)) for _ in range(counts[i, j])]
    m, ref = np.array(cells).T  # (points,) map class and reference class of every point
    n_h = np.bincount(m, minlength=len(N))

    def ratio(y, x):
        w = N[m] / n_h[m]
        R = (w * y).sum() / (w * x).sum()
        d = y - R * x
        v = sum(N[h] ** 2 * d[m == h].var(ddof=1) / n_h[h] for h in range(len(N)) if n_h[h])
        return R, np.sqrt(v) / (w * x).sum()

    one, C = np.ones(len(m)), range(len(N))
    return {"overall": ratio((m == ref) * 1.0, one),
            "users": [ratio((m == i) & (ref == i), m == i) for i in C],
            "producers": [ratio((m == j) & (ref == j), ref == j) for j in C],
            "area": [ratio((ref == k) * 1.0, one) for k in C]}


@pytest.mark.parametrize("counts, mapped", [
    (PAPER_COUNTS, PAPER_PIXELS),
    ([[30, 2, 0], [5, 20, 1], [0, 0, 12]], [5000, 900, 37]),  # a stratum whose points all agree
])
def test_the_estimator_equals_weighted_means_over_the_sample_points(counts, mapped):
    r, by_points = assess.stratified(counts, mapped), stratified_by_points(counts, mapped)
    assert np.allclose(by_points["overall"], (r["overall"], r["overall_se"]), rtol=0, atol=1e-12)
    for key in ("users", "producers", "area"):
        assert np.allclose(np.array(by_points[key]).T, (r[key], r[key + "_se"]), rtol=0, atol=1e-12), key


def test_allocation_gives_each_class_its_minimum_and_the_rest_by_area():
    for pixels, size, least in [([10, 1000, 5, 100_000], 300, 50), (PAPER_PIXELS, 640, 75),
                                ([3, 4, 100], 107, 50), ([60, 60, 10_000], 200, 50)]:
        n, base = assess.allocate(pixels, size, least), np.minimum(pixels, least)
        assert n.sum() == size and (n >= base).all() and (n <= pixels).all(), (pixels, n)
        room = np.array(pixels) - base
        capped = n == np.array(pixels)
        share = (size - base.sum()) * room / room.sum()  # the rest by area, where no class is full
        if not capped.any():
            assert (abs(n - base - share) < 1).all(), (pixels, n)
    assert assess.allocate([10, 1000, 5, 100_000], 300).tolist() == [10, 52, 5, 233]


def handmade_maps(root, truth_changes=40, seed=0):
    """Two masks written as predict.py writes them (palette PNGs, one with a world file; 255 = no data),
    their areas.csv, and a 'truth' for each that differs from the map at some pixels -> {image: truth}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names, truths, rows = ["Water", "Land", "Road"], {}, []
    for image, (h, w), geo in [("scenes/a.tif", (30, 40), [0.5, 0.0, 0.0, -0.5, 500000.25, 2800000.0]),
                               ("scenes/b.jpg", (50, 20), None)]:
        pred = np.zeros((h, w), np.uint8)
        pred[:, w // 2 :] = 1
        pred[h // 3 : h // 3 + 6, 2:12] = 2
        pred[:4, :5] = data.IGNORE  # no data
        stem = Path(image).stem
        path = maps.write_mask(maps.colourize(pred, COLOURS), root / stem, geo and {"tags": {}, "world": geo,
                                                                                    "prj": None})
        truth = pred.copy()
        ys, xs = rng.integers(0, h, truth_changes), rng.integers(0, w, truth_changes)
        truth[ys, xs] = np.where(pred[ys, xs] == data.IGNORE, data.IGNORE, rng.integers(0, 3, truth_changes))
        truths[image] = truth
        rows += [(image, *row, path.name) for row in maps.class_areas(pred, names, 0.25)]  # 0.5 m pixels
    with open(root / "areas.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "class", "pixels", "share", "hectares", "mask"), *rows])
    return truths


def label_sample(path, truths, names=("Water", "Land", "Road"), out=None):
    """The simulated person: each point of a sample file gets the class of the truth there."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["class"] = names[truths[r["image"]][int(r["y"]), int(r["x"])]]
    with open(out or path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_the_sample_is_stratified_blind_off_no_data_and_the_same_for_a_seed(tmp_path, monkeypatch):
    assert assess.IGNORE == data.IGNORE  # the no-data value of the masks, written out in assess.py
    out = tmp_path / "maps"
    handmade_maps(out)
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "12", "--seed", "4"]) == 0
    text = (out / "sample.csv").read_text()
    with open(out / "sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "x", "y", "class", "sample"] and {r["class"] for r in rows} == {""}
    assert [int(r["sample"]) for r in rows] == list(range(1, 61))
    strata = json.loads((out / "strata.json").read_text())
    masks = {m["image"]: assess.read_mask(out / m["mask"]) for m in strata["masks"]}
    mapped = [masks[r["image"]][int(r["y"]), int(r["x"])] for r in rows]
    assert data.IGNORE not in mapped and len({(r["image"], r["x"], r["y"]) for r in rows}) == 60
    assert np.bincount(mapped, minlength=3).tolist() == strata["points"] == [23, 24, 13]  # 12 each + by area
    assert strata["seed"] == 4
    assert sum(strata["pixels"]) == sum((m != data.IGNORE).sum() for m in masks.values())
    assert mapped[:12] != sorted(mapped[:12])  # the strata mixed in the order a person sees
    geo = json.loads((out / "sample.geojson").read_text())["features"]
    a = [r for r in rows if r["image"] == "scenes/a.tif"]
    assert len(geo) == len(a) and geo[0]["properties"]["class"] == ""
    x, y = geo[0]["properties"]["x"], geo[0]["properties"]["y"]
    assert geo[0]["geometry"]["coordinates"] == [500000.25 + 0.5 * x, 2800000.0 - 0.5 * y]
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "12", "--seed", "4"]) == 0
    assert (out / "sample.csv").read_text() == text  # the same seed, the same points
    assert assess.main(["sample", str(out), "--size", "60", "--min-per-class", "12", "--seed", "5"]) == 0
    assert (out / "sample.csv").read_text() != text
    # strip by strip (3 rows) against all the pixels of each class at once: the same points
    monkeypatch.setattr(assess, "STRIP", 3)
    classes, images = assess.read_areas(out)
    drawn = assess.draw(out, images, [5, 9, 4], np.random.default_rng(1))
    rng, expected = np.random.default_rng(1), set()
    for c, k in enumerate([5, 9, 4]):
        every = [(im, x, y) for im, m in masks.items() for y, x in zip(*np.nonzero(m == c))]
        expected |= {every[i] for i in rng.choice(len(every), k, replace=False)}
    assert set(drawn) == expected and len(drawn) == 18


def test_estimate_end_to_end_from_a_sample_labelled_by_a_script(tmp_path, capsys):
    out = tmp_path / "maps"
    truths = handmade_maps(out)
    assert assess.main(["sample", str(out), "--size", "80", "--min-per-class", "15"]) == 0
    rows = label_sample(out / "sample.csv", truths)
    assert assess.main(["estimate", str(out)]) == 0
    printed, result = capsys.readouterr().out, json.loads((out / "accuracy.json").read_text())
    strata = json.loads((out / "strata.json").read_text())
    masks = {m["image"]: assess.read_mask(out / m["mask"]) for m in strata["masks"]}
    counts = np.zeros((3, 3), int)
    for r in rows:
        image, x, y = r["image"], int(r["x"]), int(r["y"])
        counts[masks[image][y, x], truths[image][y, x]] += 1
    assert result["error_matrix"]["points"] == counts.tolist()
    expected = assess.stratified(counts, strata["pixels"])
    ha = sum(strata["pixels"]) * 0.25 / 1e4
    assert result["unit"] == "hectares" and strata["hectares_per_pixel"] == pytest.approx(0.25 / 1e4)
    assert result["overall_accuracy"]["estimate"] == pytest.approx(expected["overall"])
    for c, name in enumerate(["Water", "Land", "Road"]):
        got = result["classes"][name]
        assert got["mapped_area"] == pytest.approx(strata["pixels"][c] * 0.25 / 1e4)
        assert got["estimated_area"]["estimate"] == pytest.approx(expected["area"][c] * ha)
        high = (expected["area"][c] + 1.96 * expected["area_se"][c]) * ha
        assert got["estimated_area"]["ci95"][1] == pytest.approx(high)
        assert got["producers_accuracy"]["se"] == pytest.approx(expected["producers_se"][c])
    assert "mapped hectares" in printed and "estimated hectares" in printed
    # the GeoJSON of the sample, labelled in its properties, together with the CSV of the other scene
    geo = json.loads((out / "sample.geojson").read_text())
    for f in geo["features"]:
        p = f["properties"]
        p["class"] = ["Water", "Land", "Road"][truths[p["image"]][p["y"], p["x"]]]
    (tmp_path / "a.geojson").write_text(json.dumps(geo))
    with open(tmp_path / "b.csv", "w", newline="") as f:
        b = [list(r.values()) for r in rows if r["image"] != "scenes/a.tif"]
        csv.writer(f).writerows([list(rows[0])] + b)
    files = [str(tmp_path / "a.geojson"), str(tmp_path / "b.csv")]
    assert assess.main(["estimate", str(out), "--sample", *files]) == 0
    again = json.loads((out / "accuracy.json").read_text())
    assert again["error_matrix"] == result["error_matrix"] and again["classes"] == result["classes"]
    # the map itself as the truth: every estimate is the mapped figure, with no error
    label_sample(out / "sample.csv", {k: m for k, m in masks.items()})
    assert assess.main(["estimate", str(out)]) == 0
    exact = json.loads((out / "accuracy.json").read_text())
    assert exact["overall_accuracy"] == {"estimate": 1.0, "se": 0.0, "ci95": [1.0, 1.0]}
    for c in exact["classes"].values():
        assert c["estimated_area"]["estimate"] == pytest.approx(c["mapped_area"])
        assert c["estimated_area"]["se"] == 0


def edit_sample(path, k, **values):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[k].update(values)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_assess_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    out = tmp_path / "maps"
    truths = handmade_maps(out)
    sample = ["sample", str(out), "--size", "40", "--min-per-class", "10"]
    labelled = tmp_path / "labelled.csv"

    def refused(argv, message):
        assert command_line(assess.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert re.match(f"error: .*{message}", err) and err.count("\n") == 1, err

    refused(["sample", str(tmp_path), "--size", "40"], "areas.csv: not found")
    refused(sample[:3] + ["20"] + sample[4:], r"--size 20: fewer than the minimum, 10 points for each of 3 "
            r"mapped classes \(30\)")
    refused(sample + ["--min-per-class", "1"], "--min-per-class 1: must be 2 or more")
    refused(["estimate", str(out)], r"strata.json: not found \(draw the sample")
    assert assess.main(sample) == 0
    label_sample(out / "sample.csv", truths, out=labelled)
    refused(["estimate", str(out)], "40 of the 40 points of .* have no class yet")
    edit_sample(labelled, 3, **{"class": ""})
    edit_sample(labelled, 5, **{"class": ""})
    refused(["estimate", str(out), "--sample", str(labelled)], "2 of the 40 points")
    label_sample(out / "sample.csv", truths, out=labelled)
    edit_sample(labelled, 0, **{"class": "Lava"})
    estimate = ["estimate", str(out), "--sample", str(labelled)]
    refused(estimate, "labelled.csv:2: class 'Lava' is not a class of the map")
    label_sample(out / "sample.csv", truths, out=labelled)
    edit_sample(labelled, 1, image="scenes/a.tif", x="0", y="0")
    refused(estimate, r"labelled.csv:3: \(0, 0\) is on no data")
    label_sample(out / "sample.csv", truths, out=labelled)
    with open(labelled, newline="") as f:
        x = int(list(csv.DictReader(f))[1]["x"])
    edit_sample(labelled, 1, x=str(x + 1 if x < 10 else x - 1))
    refused(estimate, "labelled.csv:3: sample 2 is .* in .*strata.json")
    label_sample(out / "sample.csv", truths, out=labelled)
    assert not (out / "accuracy.json").exists()  # nothing written by a refused estimate
    label_sample(out / "sample.csv", truths)
    before = [(out / n).read_bytes() for n in ("sample.csv", "strata.json")]
    refused(sample, "sample.csv: already holds labelled points")
    assert [(out / n).read_bytes() for n in ("sample.csv", "strata.json")] == before  # a person's work kept
    mask = out / "a_mask.png"
    im = Image.open(mask)
    pixels = np.asarray(im).copy()
    pixels[-1, -1] = 0 if pixels[-1, -1] else 1
    changed = Image.fromarray(pixels, mode="P")
    changed.putpalette(im.getpalette())
    changed.save(mask)
    refused(["estimate", str(out)], "a_mask.png: its pixels per class differ from those in strata.json")
    (out / "sample.csv").unlink()  # labelled in QGIS instead: the GeoJSON is kept the same way
    geo = json.loads((out / "sample.geojson").read_text())
    geo["features"][0]["properties"]["class"] = "Water"
    (out / "sample.geojson").write_text(json.dumps(geo))
    refused(sample, "sample.geojson: already holds labelled points")
    # a class of one pixel cannot have the 2 points its stratum's variance needs
    out = tmp_path / "one"
    truths = handmade_maps(out)
    for image, truth in truths.items():
        m = assess.read_mask(out / f"{Path(image).stem}_mask.png").copy()
        m[m == 2] = 1
        if image == "scenes/b.jpg":
            m[-1, -1] = 2
        truths[image] = m
        maps.write_mask(maps.colourize(m, COLOURS), out / Path(image).stem, None)
    rows = [(im, *row, f"{Path(im).stem}_mask.png") for im, m in truths.items()
            for row in maps.class_areas(m, ["Water", "Land", "Road"], None)]
    with open(out / "areas.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "class", "pixels", "share", "hectares", "mask"), *rows])
    assert assess.main(["sample", str(out), "--size", "30", "--min-per-class", "10"]) == 0
    label_sample(out / "sample.csv", truths)
    refused(["estimate", str(out)], "a stratum needs 2 points or more for a variance; points of Road 1")
    assert json.loads((out / "strata.json").read_text())["hectares"] is None


# ---------------------------------------------------------------------------- interrupted runs


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1})

    def torn(obj, f):  # a kill in the middle of writing
        Path(f).write_bytes(b"half a fi")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    assert torch.load(path)["epoch"] == 1


def test_a_full_disk_is_one_line_and_keeps_the_last_whole_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train.main(tiny_args(tiny, run))  # epoch 1 on disk

    def full(obj, f):  # the disk fills up in the middle of epoch 2's checkpoint, as torch.save reports it
        Path(f).write_bytes(b"half a fi")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    assert command_line(train.main, tiny_args(tiny, run, "--epochs", "2", "--resume")) == 2
    monkeypatch.undo()
    said = capsys.readouterr().err
    assert re.fullmatch(r"error: \S+: cannot write the checkpoint of epoch 2 \(write failed; \d+ MB free on "
                        r"its disk\); the last whole checkpoint: \S+ckpt.pt \(after epoch 1\)\n", said)
    assert not list(run.glob("*.tmp"))  # no half-written file left on the full disk
    assert torch.load(run / "ckpt.pt", weights_only=True)["epoch"] == 1


def test_a_bad_input_found_late_leaves_no_half_made_run(tiny, tmp_path):
    out = tmp_path / "new" / "run"
    assert command_line(train.main, tiny_args(tiny, out, "--weights", str(tmp_path / "missing.pth"))) == 2
    assert not (tmp_path / "new").exists()  # the folder tried for writing is gone again
    train.main(tiny_args(tiny, out))  # the same command with the right weights: no "already holds a run"
    assert (out / "ckpt.pt").exists()


def test_predict_never_writes_over_maps_nor_over_filled_in_suggestions(tiny_run, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(tmp_path / "a.png"), "--out", str(out), "--precision",
            "fp32", "--suggest", "2"]
    assert predict.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert command_line(predict.main, args) == 2  # a second run into the same folder: refused, unchanged
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    lines = (out / "suggestions.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",,", ",Water,", 1)  # a person fills in one class
    (out / "suggestions.csv").write_text("\n".join(lines) + "\n")
    filled = (out / "suggestions.csv").read_bytes()
    assert command_line(predict.main, args + ["--overwrite"]) == 2  # whatever the flag says
    assert predict.main(args[:-2] + ["--overwrite"]) == 0  # maps written over, the suggestions left alone
    assert (out / "suggestions.csv").read_bytes() == filled


def test_existing_runs_are_refused_unless_resumed_or_overwritten(mini, tmp_path):
    args = tiny_args(mini, tmp_path / "run", "--patch", "32")
    train.main(args)
    with pytest.raises(DataError, match="already holds a run"):
        train.main(args)
    changed = [("--lr", "0.01"), ("--points", "7"), ("--seed", "3"), ("--batch-size", "2"), ("--gamma", "1"),
               ("--val-tiles", "1"), ("--class-weights", "none"), ("--patch", "64"), ("--bands", "3,2,1")]
    for flag, value in changed:
        with pytest.raises(DataError, match=f"--resume: {flag} .* differs from the run's"):
            train.main(args + ["--resume", flag, value])
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    train.main(args + ["--overwrite", "--epochs", "2"])  # starts over: two epochs, not one more
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in again] == [1, 2] and again[0]["loss"] == history[0]["loss"]
    train.main(args + ["--epochs", "3", "--resume"])
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 3
    old = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    del old["args"]["ema"]  # a run written before --ema existed: it ran without the average
    torch.save(old, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(DataError, match="--resume: --ema 0.5 differs from the run's 0.0"):
        train.main(args + ["--epochs", "4", "--resume", "--ema", "0.5"])
    train.main(args + ["--epochs", "4", "--resume"])
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 4


def test_the_moving_average_starts_from_the_first_step_not_the_random_init(tiny, tmp_path):
    train.main(tiny_args(tiny, tmp_path / "run", "--ema", "0.999999"))  # 2 steps: about the first step's
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)  # the init train.py draws for --seed 0
    init = build_model(len(saved["classes"]), "none").state_dict()
    first_step = saved["model"]["head.weight"]
    assert (first_step - init["head.weight"]).abs().max() > 1e-4  # an init in the average would weigh ~1
    assert (first_step - saved["trained"]["head.weight"]).abs().max() > 1e-4  # and the second step ~0


def test_a_resumed_run_with_a_moving_average_restores_both_weights(mini, tmp_path):
    constant = ["--lr-schedule", "constant", "--patch", "32"]  # one epoch and two then follow the same lr
    train.main(tiny_args(mini, tmp_path / "whole", "--ema", "0.5", "--epochs", "2", *constant))
    train.main(tiny_args(mini, tmp_path / "resumed", "--ema", "0.5", *constant))
    with pytest.raises(DataError, match="--resume: --ema 0.0 differs from the run's 0.5"):
        train.main(tiny_args(mini, tmp_path / "resumed", "--resume", "--epochs", "2", *constant))
    train.main(tiny_args(mini, tmp_path / "resumed", "--ema", "0.5", "--resume", "--epochs", "2", *constant))
    whole, resumed = [torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("whole", "resumed")]
    for weights in ("model", "trained"):  # the average predict.py maps with, and the trained weights
        assert all(torch.equal(whole[weights][k], resumed[weights][k]) for k in whole[weights]), weights
    assert not torch.equal(whole["model"]["head.weight"], whole["trained"]["head.weight"])
    out = tmp_path / "scored"  # validation scored the average: predict.py's numbers from the checkpoint
    predict.main(["--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--data", str(mini), "--tiles", "2", "--out",
                  str(out), "--precision", "fp32", "--device", "cpu"])
    validated = json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"][-1]
    assert json.loads((out / "metrics.json").read_text())["iou"] == validated["iou"]


def wait_for_epochs(run, n, proc, timeout=120):
    """Until the run in `run` has finished n epochs; a child that ends or hangs first fails the test."""
    end = time.time() + timeout
    while proc.poll() is None and time.time() < end:
        try:
            if len(json.loads((run / "metrics.json").read_text())["history"]) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no epoch {n} within {timeout}s: " + proc.communicate()[0])


def test_kill_9_then_resume_gives_the_same_loss_table(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path / "killed", "--epochs", "2")
    proc = start_script("train.py", *args)
    wait_for_epochs(tmp_path / "killed", 1, proc)
    proc.send_signal(signal.SIGKILL)  # in epoch 2
    proc.wait()
    train.main(args + ["--resume"])
    assert "resuming " + str(tmp_path / "killed") + " after epoch 1" in capsys.readouterr().out
    train.main(tiny_args(tiny, tmp_path / "whole", "--epochs", "2"))
    runs = [tmp_path / "killed", tmp_path / "whole"]
    history = [json.loads((run / "metrics.json").read_text())["history"] for run in runs]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]
    assert [h["miou"] for h in history[0]] == [h["miou"] for h in history[1]]


def test_ctrl_c_says_where_the_checkpoint_is_and_exits_130(tiny, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(*a, **k):  # Ctrl-C in epoch 2 (2 steps an epoch): Python raises KeyboardInterrupt there
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return partial_focal_ce(*a, **k)

    monkeypatch.setattr(train, "partial_focal_ce", interrupted)
    code = None
    try:
        train.main(tiny_args(tiny, tmp_path / "run", "--epochs", "50"))
    except KeyboardInterrupt:
        pytest.fail("the interrupt left train.main as it came")  # not as the end of pytest's session
    except SystemExit as stop:
        code = stop.code
    said = capsys.readouterr().out
    assert code == 130 and f"last checkpoint: {tmp_path / 'run' / 'ckpt.pt'} (after epoch 1)" in said
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["epoch"] == 1


def test_non_finite_loss_stops_with_step_and_images(tiny, tmp_path, monkeypatch, capsys):
    args = tiny_args(tiny, tmp_path / "run")
    train.main(args)
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        loss = partial_focal_ce(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train, "partial_focal_ce", poisoned)
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--epochs", "2", "--resume"])
    said = capsys.readouterr().out
    assert stop.value.code == 1 and "epoch 2 step 2: loss is nan" in said and "Tile " in said
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["epoch"] == 1  # the last good one


# ---------------------------------------------------------------------------- real data (AERIAL_DATA=path)


@pytest.mark.skipif(not os.environ.get("AERIAL_DATA"), reason="AERIAL_DATA names a Kaggle-layout data set")
def test_real_data_two_images_of_a_small_tile(tmp_path):
    real = Path(os.environ["AERIAL_DATA"])
    tile = min(layout.list_tiles(real), key=lambda t: Image.open(layout.list_tiles(real)[t][0]).size[0])
    root = tmp_path / "set"  # its first two images, one a tile, with their masks, as the data set is laid out
    root.mkdir()
    (root / "classes.json").write_bytes((real / "classes.json").read_bytes())
    for k, image in enumerate(layout.list_tiles(real)[tile][:2]):
        for path in (image, layout.mask_path(image)):
            copy = root / f"Tile {k + 1}" / path.parent.name / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    args = ["--data", str(root), "--train-tiles", "1", "--val-tiles", "2", "--epochs", "1"]
    train.main(args + ["--out", str(tmp_path / "run"), "--weights", "none"])
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert 0 < history[0]["loss"] < 1 and 0 < history[0]["miou"] <= 1
    _, colours = layout.read_classes(root)
    names, _, masks = tile_masks(root, [1], colours)
    rows = [r.split(",") for r in (tmp_path / "run" / "points.csv").read_text().splitlines()[1:]]
    n_patches = sum(len(data.grid(m.shape[0], 256)) * len(data.grid(m.shape[1], 256)) for m in masks)
    assert len(rows) == 100 * n_patches
    assert all(masks[names.index(n)][int(y), int(x)] == int(c) for n, x, y, c in rows)  # on the true classes
