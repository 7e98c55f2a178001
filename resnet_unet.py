"""The network: a U-Net decoder written out by hand on torchvision's ResNet-34 encoder.

Same layout and parameter count as the standard Unet(resnet34) of segmentation_models_pytorch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet34

# channels of the encoder features the decoder uses, shallow to deep:
# conv1 (1/2), layer1 (1/4), layer2 (1/8), layer3 (1/16), layer4 (1/32)
ENCODER_CHANNELS = [64, 64, 128, 256, 512]
# channels of the five decoder stages, deep to shallow; the last one runs at full resolution
DECODER_CHANNELS = [256, 128, 64, 32, 16]


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias: batch norm follows), batch norm, ReLU."""

    def __init__(self, in_ch, out_ch):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, then two ConvBNReLU."""

    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x, skip=None, size=None):
        # upsample to the skip's size, not by a fixed 2x, so odd input sizes line up
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = self.conv1(x)
        return self.conv2(x)


class ResNetUNet(nn.Module):
    """ResNet-34 encoder (torchvision's stage names kept) + five decoder stages + 3x3 head. The encoder
    takes `in_channels` bands: 3 for RGB photos, N for a multispectral scene (its first convolution)."""

    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        r = resnet34(weights=None)  # weights, if any, are loaded by model.py
        if in_channels != 3:  # the same convolution and initialisation as torchvision's, for N bands
            r.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(r.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        # (in, skip, out) per stage: the input is the stage before's output, the skip comes
        # from the encoder feature of the same resolution; the last stage has no skip
        e, d = ENCODER_CHANNELS, DECODER_CHANNELS
        self.up1 = DecoderBlock(e[4], e[3], d[0])  # 1/32 -> 1/16
        self.up2 = DecoderBlock(d[0], e[2], d[1])  # 1/16 -> 1/8
        self.up3 = DecoderBlock(d[1], e[1], d[2])  # 1/8  -> 1/4
        self.up4 = DecoderBlock(d[2], e[0], d[3])  # 1/4  -> 1/2
        self.up5 = DecoderBlock(d[3], 0, d[4])  # 1/2  -> 1/1
        self.head = nn.Conv2d(d[4], num_classes, kernel_size=3, padding=1)

    def forward(self, x):  # x: (B, bands, H, W), H and W >= 32
        x1 = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x2 = self.layer1(self.maxpool(x1))  # (B, 64, H/4, W/4)
        x3 = self.layer2(x2)  # (B, 128, H/8, W/8)
        x4 = self.layer3(x3)  # (B, 256, H/16, W/16)
        x5 = self.layer4(x4)  # (B, 512, H/32, W/32)
        y = self.up1(x5, x4)  # (B, 256, H/16, W/16)
        y = self.up2(y, x3)  # (B, 128, H/8, W/8)
        y = self.up3(y, x2)  # (B, 64, H/4, W/4)
        y = self.up4(y, x1)  # (B, 32, H/2, W/2)
        y = self.up5(y, size=x.shape[-2:])  # (B, 16, H, W)
        return self.head(y)  # (B, num_classes, H, W)
