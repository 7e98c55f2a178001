"""Speed that changes nothing computed: the folded upsampling and batch norm, precision by timing, devices."""
import copy
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import HERE
from resnet_unet import ResNetUNet
from support import speed
from support.cli import DataError
from support.speed import fold_batch_norm, fold_upsampling, pick_device, pick_dtype, upsample_conv


def test_the_upsampling_folded_into_the_convolution_changes_no_output_nor_gradient():
    torch.manual_seed(0)
    shapes = [(2, 5, 7, 9), (4, 5, 3, 3), (4,)]
    x, weight, bias = (torch.randn(*shape, dtype=torch.double) for shape in shapes)
    plain = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    assert torch.allclose(upsample_conv(x, weight, bias), plain, atol=1e-12)
    # the whole network, both ways: the same outputs and the same gradients (odd sizes take the plain way)
    nets = [ResNetUNet(6).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fold_upsampling(nets[0])
    folded = [m for m in nets[0].modules() if "forward" in vars(m)]
    assert folded == [nets[0].up1, nets[0].up2, nets[0].up3, nets[0].up4, nets[0].up5]  # the decoder's only
    for h, w in [(64, 96), (65, 100)]:
        image = torch.randn(2, 3, h, w, dtype=torch.double)
        outs = [net(image) for net in nets]
        assert torch.allclose(outs[0], outs[1], atol=1e-10)
        for out in outs:
            out.square().mean().backward()
        for p, q in zip(*(net.parameters() for net in nets)):
            assert torch.allclose(p.grad, q.grad, atol=1e-10)
            p.grad = q.grad = None
    copied = copy.deepcopy(nets[0])  # validation and precision timing work on copies: the fold goes along
    assert copied.up1.forward.__self__ is copied.up1


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
    """In a fresh process, as train.py and predict.py start: a heap that other libraries loaded in the
    test run (GDAL's) have not shaped."""
    check = """if 1:
        import sys
        from pathlib import Path
        import torch
        from support.speed import keep_freed_memory

        def heap():  # (start, end) of the heap that malloc grows with brk
            line = next(s for s in Path("/proc/self/maps").read_text().splitlines() if s.endswith("[heap]"))
            return [int(a, 16) for a in line.split()[0].split("-")]

        if not keep_freed_memory():
            sys.exit(3)
        block = torch.ones(16 * 2**20)  # 64 MB: by default a mapping of its own, handed back when freed
        start, end = heap()
        assert start <= block.data_ptr() < end  # from the heap instead,
        del block
        assert heap()[1] >= end  # and the heap keeps it when it is freed
    """
    done = subprocess.run([sys.executable, "-c", check], cwd=HERE, capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip("this glibc refused the mallopt settings (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)")
    assert done.returncode == 0, done.stderr
