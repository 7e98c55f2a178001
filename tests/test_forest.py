"""tools/forest.py: the random forest a field user would train on the same clicks, scored as the U-Net is."""
import json
import sys

import numpy as np
import pytest

from support import IGNORE, layout
from support.cli import command_line


def test_forest_features_are_each_band_and_its_window_means_and_deviations():
    pytest.importorskip("scipy")
    from tools import forest

    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    f = forest.features(image)
    assert f.shape == (20, 24, 21)
    padded = np.pad(image.astype(np.float64), ((7, 7), (7, 7), (0, 0)), mode="symmetric")  # mirrored edges
    for y, x in [(0, 0), (10, 13), (19, 23)]:
        want = [image[y, x]]
        for side in (3, 7, 15):
            r = side // 2
            window = padded[y + 7 - r : y + 8 + r, x + 7 - r : x + 8 + r].reshape(-1, 3)
            want += [window.mean(0), window.std(0)]
        assert np.allclose(f[y, x], np.concatenate(want), atol=1e-3), (y, x)


def test_the_forest_maps_every_validation_pixel_of_a_run_from_its_points(tiny, tiny_run, tmp_path, capsys,
                                                                         monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    from tools import forest

    _, run = tiny_run
    forest.main([str(run), "--out", str(tmp_path / "forest.json")])
    s = json.loads((tmp_path / "forest.json").read_text())
    _, colours = layout.read_classes(tiny)
    masks = layout.read_images(layout.tile_files(tiny, [3]), colours)[2]  # the run's validation tile
    assert np.sum(s["confusion"]) == sum(int((m != IGNORE).sum()) for m in masks)
    assert 0 < s["miou"] <= 1 and s["trees"] == 200 and "mIoU" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()  # not a run: one line, exit code 2
    assert command_line(forest.main, [str(tmp_path / "empty")]) == 2
    monkeypatch.setitem(sys.modules, "sklearn.ensemble", None)  # scikit-learn not installed: the hint
    assert command_line(forest.main, [str(run)]) == 2
    assert "pip install scikit-learn scipy" in capsys.readouterr().err
