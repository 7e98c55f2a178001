"""Runs: torchrun, resume, interrupted and refused runs, bad arguments as one line and exit code 2."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from conftest import HERE, start_script, tiny_args
from loss import partial_focal_ce
from support import runs, speed
from support.cli import DataError, command_line
from support.runs import save_checkpoint


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
    from tools import bench

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
        (train, ["--cutmix", "1.5"], "--cutmix 1.5: must be from 0"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bad_device(tiny, tmp_path):
    with pytest.raises(DataError, match="no CUDA GPU"):
        train.main(tiny_args(tiny, tmp_path / "run", "--device", "cuda"))
    with pytest.raises(DataError, match="not a device"):
        predict.main(["--ckpt", "x.pt", "--device", "gpu0", "a.jpg", "--out", str(tmp_path / "p")])


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
    assert re.fullmatch(r"error: \S+ckpt.pt: cannot be written \(write failed; [\d,]+ MB free there\): epoch "
                        r"2 is not saved; the last whole checkpoint: \S+ckpt.pt \(after epoch 1\)\n", said)
    assert not list(run.glob(".*"))  # no half-written file left on the full disk
    assert torch.load(run / "ckpt.pt", weights_only=True)["epoch"] == 1


def test_a_bad_input_found_late_leaves_no_half_made_run(tiny, tmp_path):
    out = tmp_path / "new" / "run"
    assert command_line(train.main, tiny_args(tiny, out, "--weights", str(tmp_path / "missing.pth"))) == 2
    assert not (tmp_path / "new").exists()  # the folder tried for writing is gone again
    train.main(tiny_args(tiny, out))  # the same command with the right weights: no "already holds a run"
    assert (out / "ckpt.pt").exists()


def test_existing_runs_are_refused_unless_resumed_or_overwritten(mini, tmp_path):
    args = tiny_args(mini, tmp_path / "run", "--patch", "32")
    train.main(args)
    with pytest.raises(DataError, match="already holds a run"):
        train.main(args)
    changed = [("--lr", "0.01"), ("--points", "7"), ("--seed", "3"), ("--batch-size", "2"), ("--gamma", "1"),
               ("--val-tiles", "1"), ("--class-weights", "none"), ("--patch", "64"), ("--bands", "3,2,1"),
               ("--jitter", "0.2"), ("--cutmix", "0.5")]
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
    del old["args"]["ema"], old["args"]["jitter"], old["args"]["cutmix"]  # written before these flags
    torch.save(old, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(DataError, match="--resume: --ema 0.5 differs from the run's 0.0"):
        train.main(args + ["--epochs", "4", "--resume", "--ema", "0.5"])
    with pytest.raises(DataError, match="--resume: --jitter 0.05 differs from the run's 0.0"):
        train.main(args + ["--epochs", "4", "--resume"])
    with pytest.raises(DataError, match="--resume: --cutmix 1.0 differs from the run's 0.0"):
        train.main(args + ["--epochs", "4", "--resume", "--jitter", "0"])
    train.main(args + ["--epochs", "4", "--resume", "--jitter", "0", "--cutmix", "0"])
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 4


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


@pytest.mark.resnet34
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


def test_a_run_writes_through_no_link_and_holds_its_folder(mini, tmp_path, capsys):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("someone's file")
    for name in ["ckpt.pt.tmp", "metrics.json.tmp", "train.lock"]:  # names a run might write by
        (out / name).symlink_to(victim)
    args = tiny_args(mini, out, "--patch", "32")
    with pytest.raises(DataError, match="train.lock: cannot be made .*a link there is not followed"):
        train.main(args)
    (out / "train.lock").unlink()
    train.main(args)
    assert victim.read_text() == "someone's file" and (out / "ckpt.pt").is_file()
    assert not (out / "train.lock").exists()  # let go at the end
    (out / "panel.png").unlink()
    (out / "panel.png").symlink_to(victim)  # where an output goes: refused before any work
    assert command_line(train.main, args + ["--overwrite"]) == 2
    assert "panel.png: is a link; a run never writes through one" in capsys.readouterr().err
    (out / "panel.png").unlink()
    lock = runs.hold(out)  # a second train.py on the folder: refused while the first holds it
    with pytest.raises(DataError, match=rf"another train.py \(process {os.getpid()}\) is running there"):
        train.main(args + ["--overwrite"])
    runs.release(out, lock)
    (out / "train.lock").write_text("12345\n")  # left by a run that was killed: held by nobody
    train.main(args + ["--overwrite"])


def test_a_resumed_run_must_have_the_classes_and_bands_it_had(mini, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(mini, data)
    args = tiny_args(data, tmp_path / "run", "--patch", "32")
    train.main(args)
    classes = json.loads((data / "classes.json").read_text())
    renamed = json.loads(json.dumps(classes))
    renamed["classes"][2]["title"] = "Street"  # the same colours, another name
    (data / "classes.json").write_text(json.dumps(renamed))
    with pytest.raises(DataError, match=r"--resume: the classes are now Water, .*Street.*; the run's were "
                                        r"Water, .*Road"):
        train.main(args + ["--resume", "--epochs", "2"])
    added = json.loads(json.dumps(classes))
    added["classes"].append({"title": "Pool", "color": "#00FFFF"})
    (data / "classes.json").write_text(json.dumps(added))
    with pytest.raises(DataError, match="--resume: the classes are now .*Pool"):
        train.main(args + ["--resume", "--epochs", "2"])
    (data / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(DataError, match="--resume: --bands .* differs"):  # bands: a setting of the run
        train.main(args + ["--resume", "--epochs", "2", "--bands", "1,2"])
    train.main(args + ["--resume", "--epochs", "2"])


@pytest.mark.parametrize("key, value", [("colours", "#E2A929,#8429F6"), ("args", ["--epochs", "5"]),
                                        ("classes", "Water,Land"), ("norm", {"mean": "0"}), ("bands", None)])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_one_line(tiny_run, tmp_path, key, value, capsys):
    ckpt = torch.load(tiny_run[1] / "ckpt.pt", weights_only=True)
    ckpt[key] = value
    torch.save(ckpt, tmp_path / "edited.pt")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    argv = ["--ckpt", str(tmp_path / "edited.pt"), str(image), "--out", str(tmp_path / "maps")]
    assert command_line(predict.main, argv) == 2
    assert re.fullmatch(rf"error: \S+edited.pt: not a checkpoint of this project \(its {key} is .*\)\n",
                        capsys.readouterr().err)
