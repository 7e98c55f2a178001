"""The model as a file: built with its encoder weights, fed normalised inputs of any number of bands,
saved and loaded as a checkpoint."""
import os
from pathlib import Path

import numpy as np
import torch
from torchvision.models import ResNet34_Weights

import scene
from cli import DataError
from resnet_unet import ResNetUNet

# the encoder's ImageNet weights expect 8-bit RGB divided by 255 and normalised with ImageNet's
# statistics; RGB photos are fed so whether or not the weights are used. Other images (16-bit, float,
# other than 3 bands) are normalised per band with the mean and std of the training images instead.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_model(num_classes, weights="imagenet", in_channels=3):
    """ResNetUNet with its encoder from `weights`: 'imagenet', 'none' or a path to a
    torchvision resnet34 state_dict (.pth). Without network the ImageNet weights fall back to
    random init, with one warning saying where to put the file."""
    model = ResNetUNet(num_classes, in_channels)
    if weights == "none":
        return model
    if weights == "imagenet":
        url = ResNet34_Weights.IMAGENET1K_V1.url
        try:  # read from $TORCH_HOME/hub/checkpoints, downloaded there first if missing
            state = ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except OSError as e:  # URLError, timeouts, a full disk: all OSErrors
            place = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            print(f"warning: no ImageNet weights ({e}); to use them put {url} at {place}. Going on from "
                  "random init.")
            return model
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"--weights {weights}: no such file (expected 'imagenet', 'none' or a .pth path)")
        except Exception as e:
            raise DataError(f"--weights {weights}: cannot read it as a state_dict ({e.__class__.__name__})")
    # our encoder keeps torchvision's names (conv1, bn1, layer1..4), so its state_dict loads as it
    # is; only the classifier (fc) has no place here and every other missing key is the decoder's
    state = {k: v for k, v in state.items() if not k.startswith("fc.")} if isinstance(state, dict) else {}
    rgb = state.get("conv1.weight")
    if in_channels != 3 and isinstance(rgb, torch.Tensor) and rgb.shape[1] == 3:
        # N bands: each takes the filter of red, green, blue in turn, scaled by 3/N, so that the first
        # layer's output keeps the scale it had on 3 bands of the same statistics
        state["conv1.weight"] = rgb[:, [i % 3 for i in range(in_channels)]] * (3 / in_channels)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # right names, wrong shapes
        missing, unexpected = [], ["(shapes differ)"]
    if unexpected or any(k.startswith(("conv1", "bn1", "layer")) for k in missing):
        raise DataError(f"--weights {weights}: not a torchvision resnet34 state_dict")
    return model


def to_input(images, norm="imagenet"):
    """(B, H, W, bands) samples -> normalised (B, bands, H, W) float32, channels_last in memory (the
    permute is free: channels_last is exactly the layout the images already have). norm: 'imagenet'
    for 8-bit RGB, else {"mean": [...], "std": [...]} per band, in the samples' own units."""
    x = images.permute(0, 3, 1, 2).float()
    if norm == "imagenet":
        x, mean, std = x.div_(255), MEAN, STD
    else:
        mean, std = norm["mean"], norm["std"]
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def input_norm(images, valids):
    """How a data set is fed to the network: 'imagenet' when every image is 8-bit RGB (what the
    encoder's weights were trained on), else the mean and std of each band over the training images'
    valid pixels: one scale for every scene, so the same reflectance is the same input everywhere."""
    if all(im.dtype == np.uint8 and im.shape[2] == 3 for im in images):
        return "imagenet"
    return scene.band_statistics(images, valids)


def model_input(s, meta, bands=None):
    """A scene as scene.read_scene gives it -> (samples as the checkpoint's model takes them: its bands,
    or `bands` of this scene in their place; no data set to what normalises to 0; the norm for
    to_input). Checkpoints without a norm were trained on each scene stretched on its own to 8-bit RGB:
    such a scene is what they are given."""
    if "norm" not in meta:
        if bands and len(bands) not in (1, 3):
            raise DataError(f"--bands {','.join(map(str, bands))}: this checkpoint takes 1 band (grey) "
                            "or 3")
        return scene.display(s["samples"], s["valid"], bands or meta.get("bands")), "imagenet"
    n, trained, kind = s["samples"].shape[2], meta["bands"], s["samples"].dtype
    if meta["norm"] == "imagenet" and (kind != np.uint8 or n != 3):  # a model of 8-bit RGB photos sees such
        print(f"{n} band(s) of {kind}: the model's were 8-bit RGB; it is given the picture a person sees")
        return scene.display(s["samples"], s["valid"], bands or (trained if n >= 3 else None)), "imagenet"
    if meta["norm"] != "imagenet" and kind != np.dtype(meta["dtype"]):  # reflectance as 0-1 or as 0-10000?
        print(f"warning: {kind} samples, the model learnt from {meta['dtype']}: if their units differ, so "
              "does the map")
    if bands and len(bands) != len(trained):
        raise DataError(f"--bands {','.join(map(str, bands))}: the model takes {len(trained)} bands")
    if not bands and meta["args"].get("bands") is None and n != len(trained):  # trained on all bands
        raise DataError(f"has {n} band(s), the model's images had {len(trained)} (choose some with --bands)")
    bands = bands or trained
    if max(bands) > n:
        raise DataError(f"has {n} band(s), the model takes bands {','.join(map(str, bands))}")
    samples = s["samples"] if bands == list(range(1, n + 1)) else s["samples"][..., [b - 1 for b in bands]]
    return scene.fill_no_data(samples, s["valid"], no_data_value(meta["norm"])), meta["norm"]


def no_data_value(norm):
    """The sample values that `norm` turns into 0: the data set's average pixel."""
    return np.array(MEAN) * 255 if norm == "imagenet" else np.array(norm["mean"])


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


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode on device, checkpoint dict: classes, colours, patch, bands, norm, precision,
    args...). The file is mapped, not read, so only the tensors used come from disk (the optimizer's
    state, two thirds of the file, never does), and the dict comes back without the weights and that
    state. A run that resumes needs that state: it reads the file whole with read_checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        with torch.device("meta"):  # no random init of weights that are replaced at once
            model = ResNetUNet(len(ckpt["classes"]), ckpt["model"]["conv1.weight"].shape[1])
        model = model.to_empty(device="cpu")
        model.load_state_dict(ckpt["model"])
        # the weights are in the model: let go of the mapped file, whose pages read count as memory
        ckpt.pop("model"), ckpt.pop("optimizer", None)
    except Exception as e:
        raise DataError(f"{path}: not a checkpoint of this project ({e.__class__.__name__})")
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt


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
