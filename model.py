"""The model as a file: built with its encoder weights, fed normalised inputs, saved and loaded as a
checkpoint."""
import os
from pathlib import Path

import torch
from torchvision.models import ResNet34_Weights

from cli import DataError
from resnet_unet import ResNetUNet

# the encoder's ImageNet weights expect inputs normalised with ImageNet's statistics; a model
# trained from random init uses them too, so every checkpoint is read the same way
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_model(num_classes, weights="imagenet"):
    """ResNetUNet with its encoder from `weights`: 'imagenet', 'none' or a path to a
    torchvision resnet34 state_dict (.pth). Without network the ImageNet weights fall back to
    random init, with one warning saying where to put the file."""
    model = ResNetUNet(num_classes)
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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # right names, wrong shapes
        missing, unexpected = [], ["(shapes differ)"]
    if unexpected or any(k.startswith(("conv1", "bn1", "layer")) for k in missing):
        raise DataError(f"--weights {weights}: not a torchvision resnet34 state_dict")
    return model


def to_input(images):
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float32, channels_last in memory (the
    permute is free: channels_last is exactly the layout the uint8 images already have)."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def save_checkpoint(path, ckpt):
    """Write to a temporary file, then rename: a kill leaves the old checkpoint or the new one,
    never a torn file."""
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu", mmap=True):
    """-> (model in eval mode on device, checkpoint dict: classes, colours, patch, bands, precision, args...).

    mmap: the file is mapped, not read, so only the tensors used come from disk (for inference the
    optimizer's state, two thirds of the file, never does). A run that resumes trains on that
    state and replaces the file: it reads it whole (mmap=False).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        model = ResNetUNet(len(ckpt["classes"]))
        model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint")
    except Exception as e:
        raise DataError(f"{path}: not a checkpoint of this project ({e.__class__.__name__})")
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt
