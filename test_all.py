"""The method's tests, in the README's reading order: data, loss, network, loop, whole images and scores.
Each computes something two ways, or checks a property that must hold. `pytest test_all.py` runs these;
`pytest` runs these and tests/ (files, runs, the click page, accuracy). Set AERIAL_DATA to a data set to add
a real-data run. The U-Net is trained here on a ResNet-10 encoder, for speed (conftest.py), except in the
tests marked resnet34."""
import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import predict
import train
from conftest import COLOURS, classes_json, needs_gdal, tile_masks, tiny_args, write_tiff
from loss import partial_focal_ce
from model import build_model, load_checkpoint
from resnet_unet import ResNetUNet
from support import bands, layout, rasters, synthetic
from support.bands import to_input
from support.cli import DataError
from support.runs import read_checkpoint


# --------------------------------------------------------------------------------------- weak labels: data.py


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


def test_colour_jitter_is_a_gain_and_offset_per_band_drawn_from_seed_epoch_and_index():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 4)).astype(np.uint8)
    labels = rng.integers(0, 5, (64, 64)).astype(np.uint8)
    plain = data.PatchDataset([image], [labels], 64, seed=3)
    jittered = data.PatchDataset([image], [labels], 64, seed=3, jitter=0.1, spread=np.array([10, 20, 40, 80]))
    fits = []
    for epoch in range(6):
        plain.epoch = jittered.epoch = epoch
        (a, lab_a, _), (b, lab_b, _) = plain[0], jittered[0]
        assert torch.equal(lab_a, lab_b) and torch.equal(b, jittered[0][0])  # the same turn, drawn alike
        for band, spread in enumerate([10, 20, 40, 80]):
            x, y = a[..., band].double().numpy().ravel(), b[..., band].double().numpy().ravel()
            gain, shift = np.polyfit(x, y, 1)
            assert np.abs(gain * x + shift - y).max() < 1e-3  # a straight line: nothing else done to it
            assert 0.9 <= gain <= 1.1 and abs(shift) <= 0.1 * spread + 1e-3
            fits.append(round(gain, 6))
    assert len(set(fits)) == len(fits)  # each band of each epoch its own gain
    with pytest.raises(ValueError, match="spread"):  # an offset needs the bands' units
        data.PatchDataset([image], [labels], 64, jitter=0.1)


def test_cutmix_pastes_a_box_of_the_next_patch_with_its_labels():
    x = torch.rand(4, 3, 32, 32)
    y = ((x[:, 0] * 1000).long() % 7).to(torch.uint8)  # each label a function of its pixel
    assert torch.equal(train.cut_mix(x.clone(), y.clone(), 0.0, np.random.default_rng(0))[0], x)
    shares = []
    for seed in range(8):
        mx, my = train.cut_mix(x.clone(), y.clone(), 1.0, np.random.default_rng(seed))
        assert torch.equal(my, ((mx[:, 0] * 1000).long() % 7).to(torch.uint8))  # labels moved with pixels
        for i in range(4):
            rows, cols = torch.nonzero((mx[i] != x[i]).any(0), as_tuple=True)
            if len(rows):
                box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
                assert len(rows) == (box[0].stop - box[0].start) * (box[1].stop - box[1].start)  # one box
                assert torch.equal(mx[i][:, box[0], box[1]], x[(i + 1) % 4][:, box[0], box[1]])  # the next's
            shares.append(len(rows) / 32**2)
        assert torch.equal(mx, train.cut_mix(x.clone(), y.clone(), 1.0, np.random.default_rng(seed))[0])
    assert min(shares) < 0.25 and max(shares) > 0.5


# ------------------------------------------------------------------------------------------ the loss: loss.py


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


# ---------------------------------------------------------------------- the network: resnet_unet.py, model.py


@pytest.mark.resnet34
def test_shapes_for_odd_sizes_and_parameter_count():
    model = ResNetUNet(6).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (33, 47), (65, 100)]:
            assert model(torch.randn(2, 3, h, w)).shape == (2, 6, h, w)
    # the same count as segmentation_models_pytorch's Unet("resnet34", classes=6)
    assert sum(p.numel() for p in model.parameters()) == 24_437_094


@pytest.mark.resnet34
def test_the_decoder_takes_each_skip_at_its_own_scale():
    """The forward against the U-Net written out again here: encoder stages, then each decoder stage
    upsampled to its skip (1/16, 1/8, 1/4, 1/2) and concatenated with it, then full resolution."""
    torch.manual_seed(0)
    net = ResNetUNet(3).eval()
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


@pytest.mark.resnet34
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


@pytest.mark.resnet34
def test_imagenet_filters_are_carried_over_to_any_number_of_bands(tmp_path):
    state = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(state, tmp_path / "r34.pth")
    for n in (1, 2, 4, 13):
        net = build_model(5, str(tmp_path / "r34.pth"), in_channels=n)
        assert torch.equal(net.conv1.weight, state["conv1.weight"][:, [i % 3 for i in range(n)]] * (3 / n))
        assert net(torch.zeros(1, n, 64, 64)).shape == (1, 5, 64, 64)
    assert torch.equal(build_model(5, str(tmp_path / "r34.pth")).conv1.weight, state["conv1.weight"])


# ----------------------------------------------------------------------------------------- the loop: train.py


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
    assert train.batch_norm_momentum(10_000, 500) == 1 / 100  # or the last 100 batches,
    assert train.batch_norm_momentum(10_000, 2) == 1  # an epoch of 2 steps starts afresh,
    assert train.batch_norm_momentum(10_001, 2) == 1 / 2  # the plain mean of its batches


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


def short_run(epochs, batch_size, **flags):
    """A network of batch norm and a 1x1 convolution trained by train.train_epoch on one 64x128 image cut
    in eight 32x32 patches -> (model, loader, weights after each epoch, the moving average or None)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    labels = np.full((64, 128), data.IGNORE, np.uint8)
    labels[rng.integers(0, 64, 400), rng.integers(0, 128, 400)] = rng.integers(0, 3, 400)
    dataset = data.PatchDataset([image], [labels], 32, seed=0)
    flags = {"batch-size": batch_size, "epochs": epochs, "lr-schedule": "constant", **flags}
    args = train.get_args([f for k, v in flags.items() for f in (f"--{k}", str(v))])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 3, 1))
    ema = copy.deepcopy(model) if args.ema else None
    loader = train.make_loader(dataset, args, torch.device("cpu"), 0, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    weights = []
    for epoch in range(epochs):
        train.train_epoch(model, loader, optimizer, torch.device("cpu"), torch.float32, "imagenet", args,
                          epoch, None, ema)
        weights.append(model[1].weight.detach().clone())
    return model, loader, weights, ema


def test_the_moving_average_of_a_short_run_holds_its_last_steps_not_its_first():
    # 40 steps of one batch at --ema 0.998: a constant decay leaves 0.998^39 = 92% of the first step's weights
    _, _, weights, ema = short_run(40, batch_size=8, ema=0.998, lr=0.05)
    first, last, average = weights[0].flatten(), weights[-1].flatten(), ema[1].weight.detach().flatten()
    share_of_first = torch.dot(average - last, first - last) / (first - last).square().sum()
    assert (first - last).abs().max() > 0.01  # the weights moved: there is something to tell apart
    assert share_of_first < 0.25, share_of_first  # about 0.1: the last ~5 steps, on a straight path
    # and the rule's closed form: a copy of the first step, then an average over the last ninth
    assert train.ema_decay(0, 0.998) == 0 and train.ema_decay(9, 0.998) == 0.5
    assert train.ema_decay(10**6, 0.998) == 0.998


def test_batch_norm_statistics_after_a_short_epoch_are_the_mean_over_its_batches():
    # 2 steps an epoch: momentum 1/steps = 0.5 would keep half of the last batch's statistics, a quarter of
    # the one before, and so on
    model, loader, _, _ = short_run(3, batch_size=4, cutmix=0)
    # the last epoch's batches again (the same seed and epoch, no CutMix), as the first batch norm saw them
    batches = [to_input(images, "imagenet") for images, _, _ in loader]
    mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    var = torch.stack([x.var((0, 2, 3)) for x in batches]).mean(0)  # unbiased, as batch norm keeps it
    assert torch.allclose(model[0].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[0].running_var, var, atol=1e-4)


def test_the_moving_average_starts_from_the_first_step_not_the_random_init(tiny, tmp_path):
    train.main(tiny_args(tiny, tmp_path / "run", "--ema", "0.999999"))  # 2 steps: 0.1 first, 0.9 second
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)  # the init train.py draws for --seed 0
    init = build_model(len(saved["classes"]), "none").state_dict()
    average = saved["model"]["head.weight"]
    assert (average - init["head.weight"]).abs().max() > 1e-4  # an init in the average would weigh ~1
    assert (average - saved["trained"]["head.weight"]).abs().max() > 1e-5  # a tenth of it is the first step


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


def test_dense_masks_end_to_end_with_points_0(tiny, tmp_path, capsys):
    train.main(tiny_args(tiny, tmp_path / "run", "--points", "0"))
    said = capsys.readouterr().out
    _, _, masks = tile_masks(tiny, [1, 2], layout.read_classes(tiny)[1])
    labelled = sum(int((m != data.IGNORE).sum()) for m in masks)  # every pixel with a class
    assert f"({2 * 2 * 4} patches, {labelled} labelled pixels)" in said
    assert not (tmp_path / "run" / "points.csv").exists() and (tmp_path / "run" / "panel.png").exists()


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


@needs_gdal  # a 4-band 16-bit TIFF
def test_a_fourth_band_is_learned_where_rgb_alone_cannot_learn_it(tmp_path):
    root = nir_set(tmp_path / "set")
    miou = {}
    for name, extra in [("all", []), ("rgb", ["--bands", "1,2,3"])]:
        train.main(tiny_args(root, tmp_path / name, "--points", "0", "--epochs", "3", *extra))
        miou[name] = json.loads((tmp_path / name / "metrics.json").read_text())["history"][-1]["miou"]
    assert miou["all"] > 0.55 and miou["rgb"] < 0.45  # 0.720 and 0.331 measured on a 2-core Xeon
    ckpt = torch.load(tmp_path / "all" / "ckpt.pt", weights_only=True)
    assert ckpt["bands"] == [1, 2, 3, 4] and ckpt["model"]["conv1.weight"].shape[1] == 4
    pixels = np.concatenate([rasters.read_scene(p)["samples"].reshape(-1, 4).astype(np.float64)
                             for t in (1, 2) for p in sorted((root / f"Tile {t}" / "images").iterdir())])
    assert np.allclose(ckpt["norm"]["mean"], pixels.mean(0))
    assert np.allclose(ckpt["norm"]["std"], pixels.std(0))
    # a scene of another season, twice as bright: the training images' scale, not its own
    s = rasters.read_scene(root / "Tile 3" / "images" / "s0.tif")
    plan = bands.input_plan(4, s["samples"].dtype, ckpt)
    (x1, x2), norm = (bands.model_input(x, None, plan) for x in (s["samples"], s["samples"] * 2)), plan[1]
    a, b = bands.to_input(torch.from_numpy(x1[None]), norm), bands.to_input(torch.from_numpy(x2[None]), norm)
    std = torch.tensor(norm["std"]).view(1, 4, 1, 1)
    assert torch.allclose(b - a, torch.from_numpy(x1[None]).permute(0, 3, 1, 2).float() / std, atol=1e-4)
    assert np.array_equal(bands.display(x1, None), bands.display(x2, None))  # the per-scene stretch: the same


# ------------------------------------------------------ whole images, scores, where to click next: predict.py


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
    picked = predict.suggest_clicks(predict.least_sure(margin, 32), 3, spacing=32)
    assert picked == [(14, 12), (100, 80), (60, 50)]
    margin = np.random.default_rng(0).random((200, 200))
    picked = predict.suggest_clicks(predict.least_sure(margin, 20), 30, spacing=20)
    assert len(picked) == 30
    pairs = [(a, b) for k, a in enumerate(picked) for b in picked[:k]]
    assert all((ax - bx) ** 2 + (ay - by) ** 2 >= 400 for (ax, ay), (bx, by) in pairs)


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


# ------------------------------------------------------------------------------- real data (AERIAL_DATA=path)


@pytest.mark.resnet34
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
