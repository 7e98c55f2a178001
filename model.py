"""The model as a file: the network built with its encoder's weights, and built again from a checkpoint."""
from pathlib import Path

import torch
from torchvision.models import ResNet34_Weights

from resnet_unet import ResNetUNet
from support.cli import DataError
from support.runs import read_checkpoint

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
