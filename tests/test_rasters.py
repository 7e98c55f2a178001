"""Rasters as the field writes them: bands, bit depths, layouts, no data, georeference, damaged headers."""
import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import predict
from conftest import FIXTURES, geotiff_tags, write_tiff
from support import bands, georef, layout, scene
from support.cli import DataError, band_list


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
    assert np.array_equal(bands.display(s["samples"], None, [4, 3, 2]), five[..., [3, 2, 1]])
    # 16 bits, three bands and an alpha: each band shown stretched on its own, alpha 0 is no data (black)
    deep = rng.integers(1000, 52000, (37, 45, 4)).astype(np.uint16)
    deep[..., 3] = np.where(rng.random((37, 45)) < 0.1, 0, 65535)
    write_tiff(tmp_path / "deep.tif", deep, deflate, tile, planar, extra=[2])
    s = scene.read_scene(tmp_path / "deep.tif")
    assert np.array_equal(s["valid"], deep[..., 3] > 0) and np.array_equal(s["samples"], deep[..., :3])
    ours = bands.display(s["samples"], s["valid"]).astype(int)
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
    assert np.array_equal(bands.display(s["samples"], s["valid"]), np.stack([ref] * 3, -1))
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
            shown = bands.display(s["samples"], s["valid"])
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
    shown, valid = bands.display(s["samples"], s["valid"]), s["valid"]
    assert (shown[~valid] == 0).all() and shown[valid].std() > 20  # no data black, the rest not
    for b in range(3):  # each band stretched between percentiles of its finite samples
        lo, hi = np.percentile(s["samples"][..., b][valid].astype(np.float64), [2, 98])
        ref = np.clip((s["samples"][..., b][valid] - lo) * 255 / (hi - lo), 0, 255).astype(int)
        assert np.abs(shown[..., b][valid].astype(int) - ref).max() <= 1


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
