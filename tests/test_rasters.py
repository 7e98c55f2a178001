"""Rasters as the field writes them, read through GDAL as gdalinfo reads them (the committed fixtures and
GDAL's own answers, tests/fixtures), and without GDAL what Pillow reads faithfully, the rest refused."""
import csv
import json
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import predict
from conftest import FIXTURES, needs_gdal, tiny_args, write_tiff
from support import bands, layout, rasters
from support.cli import DataError

FILES = sorted(p.name[: -len(".expected.json")] for p in FIXTURES.glob("*.expected.json")
               if json.loads(p.read_text()).get("gdal_opens") and not p.name.startswith("hostile")
               and (FIXTURES / p.name[: -len(".expected.json")]).is_file())


def stretched(band, low=2, high=98):
    """The percentile stretch written out for one band, in float64."""
    lo, hi = np.percentile(band.astype(np.float64), [low, high])
    return np.clip((band - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8)


@needs_gdal
@pytest.mark.parametrize("name", FILES + [p.name for p in FIXTURES.glob("*.SAFE")])
def test_every_raster_is_read_with_its_bands_no_data_and_place_as_gdal_reads_it(name):
    """Each kind GDAL wrote (JPEG 2000, Sentinel-2 products, VRT, ENVI, masks inside a TIFF, after a JPEG or
    in a .msk, alpha, NaN, scale and offset, 16-bit PNG, RGBN JPEG, systems with and without an EPSG code,
    GCPs and RPCs): the bands, the valid pixels and each band's mean over them, the geotransform and the
    coordinate system, against what GDAL said of the file."""
    from rasterio.crs import CRS

    gdal = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    s = rasters.read_scene(FIXTURES / name)
    h, w, n = s["samples"].shape
    alpha = sum(b["color_interp"] == "Alpha" for b in gdal.get("band", []))
    palette = [b for b in gdal.get("band", []) if b["color_interp"] == "Palette"]
    assert (w, h) == (gdal["width"], gdal["height"])
    assert n == (3 if palette else 4 if name.endswith(".SAFE") else gdal["bands"] - alpha)  # S2: B4 B3 B2 B8
    assert np.isfinite(s["samples"]).all()  # no data never leaves a NaN for the network or the stretch
    valid = np.ones((h, w), bool) if s["valid"] is None else s["valid"]
    assert valid.sum() == gdal.get("dataset_valid_pixels", gdal["valid_pixels"]) - sum(
        b["nan_pixels"] + b["inf_pixels"] for b in gdal.get("band", [])[:1])
    jpeg = "JPEG" in gdal.get("image_structure", {}).get("COMPRESSION", "") or name.lower().endswith(".jpg")
    for b, band in enumerate(gdal.get("band", [])[:n] if not palette else []):
        mean = band["mean"] * (band.get("scale") or 1) + (band.get("offset") or 0)  # scale, offset applied
        got = s["samples"][..., b][valid].astype(np.float64).mean()
        assert got == (pytest.approx(mean, abs=0.5) if jpeg else pytest.approx(mean, rel=1e-6)), b  # libjpeg
    if palette:  # a class map: its colour table says what each value shows
        table = {int(k): tuple(v[:3]) for k, v in palette[0]["color_table"]["colors"].items()}
        assert {tuple(c) for c in s["samples"][valid].reshape(-1, 3)} <= set(table.values())
    if gdal.get("georeference") in ("gcps", "rpc"):  # on the map only once warped: a picture, said so
        assert s["geo"] is None and "gdalwarp" in s["note"]
    elif gdal.get("geotransform") and gdal["geotransform"] != [0, 1, 0, 0, 0, 1]:
        c, a, b, f, d, e = gdal["geotransform"]
        assert s["geo"]["world"] == pytest.approx([a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2])
        expected = gdal.get("crs_wkt") or (gdal.get("prj") or {}).get("crs_wkt")  # a .prj, which we read
        if gdal.get("epsg"):
            assert CRS.from_wkt(s["geo"]["crs"]).to_epsg() == gdal["epsg"]
        elif expected:
            assert rasters.same_crs(s["geo"]["crs"], expected)
    else:
        assert s["geo"] is None


@needs_gdal
def test_the_crs_of_an_esri_prj_and_of_a_system_with_no_epsg_code_place_points_and_areas():
    s = rasters.read_scene(FIXTURES / "ORTHO_0001.JPG")  # .JGW and an ESRI .PRJ, in upper case
    assert s["geo"]["world"] == [0.25, 0.0, 0.0, -0.25, 326500.125, 2787999.875]
    assert s["geo"]["pixel_m2"] == 0.0625
    assert rasters.same_crs(s["geo"]["crs"], "EPSG:32640")
    naip = rasters.read_scene(FIXTURES / "naip_like_rgbn_albers_no_epsg.tif")  # Albers, defined in the file
    gdal = json.loads((FIXTURES / "naip_like_rgbn_albers_no_epsg.tif.expected.json").read_text())
    a, e = naip["geo"]["world"][0], naip["geo"]["world"][3]
    assert naip["geo"]["pixel_m2"] == pytest.approx(abs(a * e))  # metres, told by its system, no EPSG code
    lon, lat = rasters.reproject(naip["geo"]["crs"], "EPSG:4326", [naip["geo"]["world"][4] - a / 2],
                                 [naip["geo"]["world"][5] - e / 2], "test")
    assert [lon[0], lat[0]] == pytest.approx(gdal["corners_lonlat"][0], abs=1e-7)  # its top-left corner


def test_without_the_gis_extra_pillow_reads_8_bits_faithfully_and_names_what_it_cannot(monkeypatch):
    monkeypatch.setattr(rasters, "gdal", lambda: None)  # as where rasterio is not installed
    s = rasters.read_scene(FIXTURES / "scene_rgb.png")
    gdal = json.loads((FIXTURES / "scene_rgb.png.expected.json").read_text())
    assert [s["samples"][..., b].mean() for b in range(3)] == pytest.approx([b["mean"] for b in gdal["band"]])
    assert s["geo"] is None and s["valid"] is None
    jpeg = rasters.read_scene(FIXTURES / "ORTHO_0001.JPG")  # a world file: pixels placed, no system, no area
    world = [0.25, 0.0, 0.0, -0.25, 326500.125, 2787999.875]
    assert jpeg["geo"] == {"world": world, "crs": None, "pixel_m2": None}
    assert "its .prj (coordinate system) is read with the GIS extra" in jpeg["note"]
    refused = {"rgb16_12bit_data.png": "16-bit RGB PNG", "grey16.png": "16-bit grey PNG",
               "multispectral_uint16_utm40n.tif": "GeoTIFF of 4 uint16 band",
               "naip_like_rgbn_albers_no_epsg.tif": "GeoTIFF of 4 uint8 band.s., the last no alpha",
               "float64_1band.tif": "of 1 float64",
               "T40RCN_20230815T064629_B04_10m.jp2": "JPEG2000 image of mode I;16",
               "envi_4band_float32.img": "cannot read image with Pillow",
               "mosaic_tiles.vrt": "cannot read image with Pillow"}
    for name, what in refused.items():
        with pytest.raises(DataError, match=rf"{name}: .*{what}.*pip install -r requirements-gis.txt"):
            rasters.read_scene(FIXTURES / name)


def test_nan_and_infinity_are_no_data_and_the_stretch_ignores_them():
    if rasters.gdal() is None:
        pytest.skip("a float32 TIFF is read through GDAL")
    s = rasters.read_scene(FIXTURES / "float32_3band_nan_inf.tif")
    assert s["note"] == "3 band(s) of float32; no data: 2 pixels"
    shown, valid = bands.display(s["samples"], s["valid"]), s["valid"]
    assert (shown[~valid] == 0).all() and shown[valid].std() > 20  # no data black, the rest not
    for b in range(3):  # each band stretched between percentiles of its finite samples
        lo, hi = np.percentile(s["samples"][..., b][valid].astype(np.float64), [2, 98])
        ref = np.clip((s["samples"][..., b][valid] - lo) * 255 / (hi - lo), 0, 255).astype(int)
        assert np.abs(shown[..., b][valid].astype(int) - ref).max() <= 1


def test_16_bit_single_band_and_many_bands_are_read_as_stored(tmp_path):
    if rasters.gdal() is None:
        pytest.skip("16-bit and 5-band TIFFs are read through GDAL")
    values = np.random.default_rng(1).integers(1000, 52000, (30, 40)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "band.tif")
    s = rasters.read_scene(tmp_path / "band.tif")
    assert np.array_equal(s["samples"][..., 0], values) and s["note"] == "1 band(s) of uint16"
    assert np.array_equal(bands.display(s["samples"], s["valid"]), np.stack([stretched(values)] * 3, -1))
    five = np.random.default_rng(0).integers(0, 256, (37, 45, 5)).astype(np.uint8)
    write_tiff(tmp_path / "five.tif", five, deflate=True, tile=16, planar=True)
    s = rasters.read_scene(tmp_path / "five.tif")
    assert np.array_equal(s["samples"], five) and s["note"] == "5 band(s) of uint8"  # every band, as stored
    assert np.array_equal(bands.display(s["samples"], None, [4, 3, 2]), five[..., [3, 2, 1]])


@needs_gdal
def test_suggestions_and_samples_land_on_their_pixels_in_any_mix_of_systems(tiny_run, tmp_path, capsys):
    """Scenes in two UTM zones, one in an Albers system with no EPSG code, one with an ESRI .prj and one
    with no system: suggestions.geojson in longitude and latitude (RFC 7946), each point back on its pixel
    when GDAL reads it; the scene with no system named in one line."""
    names = ["utm39n_west_of_54e.tif", "utm40n_east_of_54e.tif", "naip_like_rgbn_albers_no_epsg.tif",
             "ortho_utm39n.jpg", "ortho_utm39n.jgw", "ortho_utm39n.prj", "rgb_deflate_internal_mask.tif",
             "scene_rgb.png"]
    folder = tmp_path / "scenes"
    folder.mkdir()
    for name in names:
        shutil.copy(FIXTURES / name, folder / name)
    (folder / "scene_rgb.pgw").write_text("1\n0\n0\n-1\n100.5\n200.5\n")  # a world file, no system
    out = tmp_path / "maps"
    argv = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), str(folder), "--out", str(out), "--precision", "fp32",
            "--suggest", "3", "--bands", "1,2,3"]
    assert predict.main(argv) == 0
    assert re.search(r"suggestions.geojson: leaves out \S+scene_rgb.png: no coordinate system known",
                     capsys.readouterr().out)
    doc = json.loads((out / "suggestions.geojson").read_text())
    assert "crs" not in doc and {f["properties"]["image"].split("/")[-1] for f in doc["features"]} == {
        "utm39n_west_of_54e.tif", "utm40n_east_of_54e.tif", "naip_like_rgbn_albers_no_epsg.tif",
        "ortho_utm39n.jpg", "rgb_deflate_internal_mask.tif"}
    for f in doc["features"]:
        geo = rasters.image_info(folder / f["properties"]["image"].split("/")[-1])[1]
        (x,), (y,) = rasters.reproject("EPSG:4326", geo["crs"], *zip(f["geometry"]["coordinates"]), "test")
        col, row = rasters.map_to_pixel(geo["world"], x, y)
        assert (col, row) == pytest.approx((f["properties"]["x"], f["properties"]["y"]), abs=1e-6)


@needs_gdal
def test_gps_points_land_in_the_zone_of_their_scene(tmp_path):
    """GPS points (lon, lat) near 54 E, where two UTM zones meet: each lands on the pixel GDAL puts it on,
    in the scene of its own zone."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    info = {}
    for name in ["utm39n_west_of_54e.tif", "utm40n_east_of_54e.tif"]:
        shutil.copy(FIXTURES / name, folder / name)
        info[name] = rasters.image_info(folder / name)
    rows, expected = ["lon,lat,class"], set()
    for name, ((w, h), geo) in info.items():
        for col, row in [(3, 4), (40, 20)]:
            x, y = rasters.pixel_to_map(geo["world"], col, row)
            (lon,), (lat,) = rasters.reproject(geo["crs"], "EPSG:4326", [x], [y], "test")
            rows.append(f"{lon!r},{lat!r},Water")
            expected.add((name, col, row))
    (tmp_path / "gps.csv").write_text("\n".join(rows) + "\n")
    from support import clicks

    by_image, _ = clicks.read_clicks([tmp_path / "gps.csv"], info)
    assert {(n, x, y) for n, points in by_image.items() for x, y, _ in points} == expected


def test_folders_from_a_mac_and_names_in_any_unicode_form(tmp_path):
    root = tmp_path / "set"
    shutil.copytree(FIXTURES / "mac_folder", root / "mac")
    shutil.copytree(FIXTURES / "unicode_nfd", root / "nfd")
    found = [n for n, _, _ in layout.find_images(root)]
    assert "mac/scene.tif" in found and not [n for n in found if "._" in n or "__MACOSX" in n]
    nfd = json.loads((FIXTURES / "unicode_nfd.expected.json").read_text())
    info = {n: ((1, 1), None) for n in found}
    rows = list(csv.DictReader(open(root / "nfd" / "clicks.csv", encoding="utf-8")))
    from support import clicks

    find = clicks.image_finder(info)
    for r in rows:  # written composed (NFC) in the clicks, decomposed (NFD) on the disk
        assert find(r["image"], "test").startswith("nfd/") and nfd


@needs_gdal
def test_a_sentinel2_product_is_one_scene_of_its_10_m_bands(tiny_run, tmp_path):
    safe = next(FIXTURES.glob("S2B_MSIL2A*.SAFE"))
    shutil.copytree(safe, tmp_path / safe.name)
    s = rasters.read_scene(tmp_path / safe.name / "MTD_MSIL2A.xml")
    whole = rasters.read_scene(tmp_path / safe.name)
    assert np.array_equal(s["samples"], whole["samples"]) and whole["samples"].shape[2] == 4
    assert [n for n, _, _ in layout.find_images(tmp_path)] == [safe.name]  # its .jp2 bands are not scenes
    assert rasters.same_crs(whole["geo"]["crs"], "EPSG:32640") and whole["geo"]["pixel_m2"] == 100


def test_damaged_or_hostile_headers_are_one_line_and_the_other_images_are_mapped(tiny_run, tmp_path,
                                                                                 monkeypatch, capsys):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bombs = {  # each header claims what its few bytes cannot hold
        "bomb.png": b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 40001)) + chunk(b"IEND", b""),  # 40000x40000 in 118 bytes
        **{n: (FIXTURES / n).read_bytes() for n in ["hostile_65535_samples.tif",
                                                   "hostile_100000x100000.tif"]}}
    for name, raw in bombs.items():
        (tmp_path / name).write_bytes(raw)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "good.png")
    out = tmp_path / "maps"
    args = ["--ckpt", str(tiny_run[1] / "ckpt.pt"), "--out", str(out), "--precision", "fp32", str(tmp_path)]
    assert predict.main(args) == 1
    said = capsys.readouterr().out.splitlines()
    for name in bombs:
        assert sum(line.startswith(f"skipped: {tmp_path / name}: ") for line in said) == 1
    refused = [f"{tmp_path / 'bomb.png'}: damaged or hostile header",  # before a mask of that size is made
               f"{tmp_path / 'hostile_100000x100000.tif'}: 100000x100000 pixels (10000 MP) is past the limit"]
    assert all(any(line.startswith(f"skipped: {r}") for line in said) for r in refused)
    assert sorted(p.name for p in out.glob("*_mask.*")) == ["good_mask.png", "good_mask.qml"]
    with pytest.raises(DataError, match="bomb.png: damaged or hostile header: 40000x40000 pixels of 1 band"):
        rasters.read_scene(tmp_path / "bomb.png")  # what must be held whole is checked before it is read
    monkeypatch.setattr(rasters, "MAX_MEGAPIXELS", 0.001)  # our own guard says how to raise it
    with pytest.raises(DataError, match=r"50x40 pixels .* past the limit of 0.001 MP.*MAX_MEGAPIXELS=1"):
        rasters.read_scene(tmp_path / "good.png")
    monkeypatch.setattr(rasters, "free_memory", lambda: 10**4)  # and refuses what the memory cannot hold
    monkeypatch.setattr(rasters, "MAX_MEGAPIXELS", 2000)
    with pytest.raises(DataError, match="50x40 pixels of 3 band.s. need about 0 MB of memory, this machine"):
        rasters.read_scene(tmp_path / "good.png")
    # GDAL reads a picture in blocks, so what must fit is its mask (2,000 bytes); Pillow reads it whole
    mapped = predict.main(args[:-1] + [str(tmp_path / "good.png"), "--overwrite"]) == 0
    assert mapped == (rasters.gdal() is not None)


def test_a_run_on_images_pillow_cannot_read_faithfully_is_one_line_without_the_extra(tiny, tmp_path,
                                                                                     monkeypatch, capsys):
    root = tmp_path / "set"
    shutil.copytree(tiny, root)
    shutil.copy(FIXTURES / "rgb16_12bit_data.png", root / "Tile 1" / "images" / "deep.png")
    monkeypatch.setattr(rasters, "gdal", lambda: None)
    from support.cli import command_line
    import train

    assert command_line(train.main, tiny_args(root, tmp_path / "run")) == 2
    assert re.fullmatch(r"error: .+deep.png: 16-bit RGB PNG, read through GDAL only: pip install -r "
                        r"requirements-gis.txt\n", capsys.readouterr().err)
