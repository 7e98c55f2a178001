"""Reading what remote sensing produces, for train.py, predict.py and label.py alike: images of any size,
bit depth and band count, as stored; which pixels hold no data (alpha, GDAL's no-data value and mask
bands, non-finite values); sizes checked before anything is allocated; what a person is shown; each
band's statistics. TIFFs that Pillow refuses or would cut down are decoded here; the map is georef.py's.
"""
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin

from support import georef
from support.cli import DataError

NODATA = 42113  # GDAL's no-data value, as text
# Pillow's guard against decompression bombs (179 MP) is lifted for the orthomosaics people map; this
# one of ours takes its place, with the memory check of check_size
MAX_MEGAPIXELS = float(os.environ.get("MAX_MEGAPIXELS", 2000))
OWN = {1: "none", 5: "LZW", 8: "deflate", 32946: "deflate"}  # TIFF compressions decoded here


# ---------------------------------------------------------------------------- reading


def read_scene(path):
    """An image -> dict: samples (H, W, bands) in the file's own type, without its alpha band and with
    0 where a float is not finite; valid (H, W) bool, False where there is no data, or None where every
    pixel has data; note: what was found, in words ('' for a plain photo); geo: georef.georeference."""
    path = Path(path)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        tags = tiff_tags(path)
        samples, alpha = pixels_of(path, tags)
        valid, notes = no_data(path, tags, samples, alpha)
    except (OSError, ValueError, SyntaxError, KeyError, IndexError, struct.error, zlib.error) as e:
        raise DataError(f"{path}: cannot read image ({e})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    samples = samples[..., :-1] if alpha else samples
    h, w, n = samples.shape
    if n != 3 or samples.dtype != np.uint8:
        notes.insert(0, f"{n} band(s) of {samples.dtype}{' and alpha' if alpha else ''}")
    return {"samples": samples, "valid": valid, "note": "; ".join(notes),
            "geo": georef.georeference(path, tags, (w, h))}


def image_info(path):
    """-> ((width, height), georeferencing or None), read from the file's header: no pixel decoded."""
    path = Path(path)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        tags = tiff_tags(path)
        if tags:
            size = (tags[256], tags[257])
        else:
            with Image.open(path) as im:
                size = im.size
    except (OSError, ValueError, SyntaxError, KeyError, struct.error) as e:
        raise DataError(f"{path}: cannot read image ({e})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return size, georef.georeference(path, tags, size)


def check_size(path, w, h, bands, itemsize):
    """Refuse, before any allocation, a size past MAX_MEGAPIXELS, more pixels than the file's bytes can
    hold, or a map that would not fit in the memory this machine has free: a damaged or hostile header
    claims billions of pixels in a few bytes."""
    if min(w, h, bands) < 1:
        raise DataError(f"{path}: its header says {w}x{h} pixels of {bands} band(s): no pixels to read")
    if w * h > MAX_MEGAPIXELS * 1e6:
        raise DataError(f"{path}: {w}x{h} pixels ({w * h / 1e6:.0f} MP) is past the limit of "
                        f"{MAX_MEGAPIXELS:g} MP, a guard against damaged files; to read it, set "
                        f"MAX_MEGAPIXELS={w * h // 10**6 + 1}")
    stored, size = w * h * bands * itemsize, os.path.getsize(path)
    if stored > 3000 * size:  # deflate packs 1032 bytes in one at best, LZW about 2700, JPEG far fewer
        raise DataError(f"{path}: damaged or hostile header: {w}x{h} pixels of {bands} band(s) cannot come "
                        f"out of {size} bytes")
    need = w * h * (2 * bands * itemsize + 12)  # decoded twice (Pillow's copy), then the map's arrays
    free = free_memory()
    if free is not None and need > free:
        raise DataError(f"{path}: {w}x{h} pixels of {bands} band(s) need about {need / 1e6:,.0f} MB of "
                        f"memory, this machine has {free / 1e6:,.0f} MB free")


def free_memory():
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pixels_of(path, tags):
    """-> (samples (H, W, bands) in the file's own type, whether the last band is alpha). TIFFs of the
    compressions in OWN are read here sample by sample, whatever their bands, bits and photometric
    interpretation; everything else (JPEG, PNG, JPEG-compressed or palette TIFFs) through Pillow."""
    if tags and tags.get(259, 1) in OWN and tags.get(262) != 3 and tags.get(258, (8,))[0] in (8, 16, 32, 64):
        extra = tags.get(338, ())  # what the bands after the colour ones are: 1 and 2 mean alpha
        alpha = (extra if isinstance(extra, tuple) else (extra,))[-1:] in [(1,), (2,)]
        return tiff_samples(path, tags), alpha
    try:
        im = Image.open(path)
    except OSError as e:
        if not tags:
            raise
        kind = f"TIFF compression {tags.get(259, 1)}, {tags.get(277, 1)} band(s) of {tags.get(258, (1,))[0]}"
        raise DataError(f"{path}: {kind} bits: neither read here (uncompressed, deflate, LZW) nor by Pillow "
                        f"({e}); convert it, e.g. gdal_translate -co COMPRESS=DEFLATE in.tif out.tif")
    with im:
        itemsize = {"I": 4, "F": 4}.get(im.mode, 1 + im.mode.startswith("I;16"))
        check_size(path, *im.size, len(im.getbands()), itemsize)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "RGB", "RGBX", "RGBA", "LA"):
            samples, alpha = np.asarray(im), im.mode in ("RGBA", "LA")
        else:  # palette, CMYK, YCbCr, 1-bit...: Pillow's conversion
            samples, alpha = np.asarray(im.convert("RGB")), False
    return (samples[..., None] if samples.ndim == 2 else samples), alpha


def no_data(path, tags, samples, alpha):
    """-> (valid (H, W) bool or None when every pixel has data, notes). A pixel has no data where its
    alpha is 0, where every band holds GDAL's no-data value (the tag, or .aux.xml's), where GDAL's mask
    band (inside the TIFF, or a .msk beside it) is 0, or where a band is NaN or infinite. Non-finite
    samples are set to 0."""
    valid, counts = np.ones(samples.shape[:2], bool), {}

    def drop(what, nodata):
        counts[what] = int((nodata & valid).sum())
        valid[nodata] = False

    if alpha:
        drop("alpha 0", samples[..., -1] == 0)
    bands = samples[..., :-1] if alpha else samples
    value = georef.aux_xml(path).get("nodata")
    value = float(str(tags[NODATA]).strip("\x00 ")) if NODATA in tags else value
    if value is not None and not math.isnan(value):
        drop(f"no-data value {value:g}", (bands == value).all(-1))
    for what, mask in gdal_masks(path, tags, samples.shape[:2]):
        drop(what, mask == 0)
    if bands.dtype.kind == "f":
        finite = np.isfinite(bands)
        if not finite.all():
            drop("NaN or infinite", ~finite.all(-1))
            bands[~finite] = 0  # the samples of a float TIFF are read here, into an array of our own
    notes = [f"no data: {valid.size - int(valid.sum())} pixels (" +
             ", ".join(f"{what} {n}" for what, n in counts.items()) + ")"] if not valid.all() else []
    return (None if valid.all() else valid), notes


def gdal_masks(path, tags, shape):
    """GDAL's mask band -> [(where it was found, (H, W) mask: 0 for no data)]: an image of the TIFF
    itself marked as a mask (NewSubfileType 4), usually 1-bit; the bits GDAL keeps after a JPEG's end;
    the .msk file beside the image."""
    found = []
    if tags:
        for k, ifd in enumerate(tiff_images(path, tags)):
            if ifd.get(254, 0) & 4 and not ifd.get(254, 0) & 1 and (ifd[257], ifd[256]) == shape:
                found.append(("internal mask", tiff_samples(path, ifd)[..., 0]))
                break
    if not tags:
        appended = jpeg_mask(path, shape)
        if appended is not None:
            found.append(("mask after the JPEG", appended))
    msk = georef.sidecar(path, ".msk", replace=False)
    if msk is not None:
        ifd = tiff_tags(msk)
        if not ifd or (ifd[257], ifd[256]) != shape:
            raise DataError(f"{msk}: not a mask of {path.name} (a TIFF of {shape[1]}x{shape[0]} pixels)")
        found.append((".msk", tiff_samples(msk, ifd)[..., 0]))
    return found


def jpeg_mask(path, shape):
    """GDAL's mask of a JPEG, kept after the image's end (FF D9): deflated bits, one a pixel, the first
    pixel in the lowest bit, then 4 bytes giving where they start -> (H, W) 0 or 1, or None."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        f.seek(-6, os.SEEK_END)
        end = f.read(6)
        start = struct.unpack("<I", end[2:])[0]
        f.seek(max(start - 2, 0))
        if f.read(3) != b"\xff\xd9\x78":  # the image's end, then a deflate stream
            return None
        f.seek(start)
        bits = zlib.decompressobj().decompress(f.read(), math.ceil(shape[0] * shape[1] / 8))
    if len(bits) * 8 < shape[0] * shape[1]:
        raise DataError(f"{path}: damaged GDAL mask after the JPEG ({len(bits)} bytes)")
    flat = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
    return flat[: shape[0] * shape[1]].reshape(shape)


# ---------------------------------------------------------------------------- TIFF


def tiff_tags(path):
    """The tags of a TIFF's first image, read by Pillow's parser alone (Image.open also judges the
    pixel layout and refuses many multi-band ones), or {} for any other file."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return {}
        tags = TiffImagePlugin.ImageFileDirectory_v2(head if head[2:4] in (b"+\0", b"\0+") else head[:8])
        f.seek(tags.next)
        tags.load(f)
    return tags


def tiff_images(path, first):
    """The images of a TIFF after its first (overviews, masks) -> their tags, in file order."""
    with open(path, "rb") as f:
        head = f.read(16)
        head = head if head[2:4] in (b"+\0", b"\0+") else head[:8]
        seen, ifd = set(), first
        while ifd.next and ifd.next not in seen and len(seen) < 100:  # a loop of offsets would never end
            seen.add(ifd.next)
            nxt = TiffImagePlugin.ImageFileDirectory_v2(head)
            f.seek(ifd.next)
            nxt.load(f)
            yield nxt
            ifd = nxt


def tiff_samples(path, tags):
    """The samples of one TIFF image as stored -> (H, W, bands): uncompressed, deflate or LZW, without
    or with a horizontal or floating-point predictor, in strips or tiles, bands interleaved or in
    planes, 1 to 64 bits. Every block must be in the file and hold what the image size needs."""
    w, h = tags[256], tags[257]
    bands, bits = tags.get(277, 1), tags.get(258, (1,))[0]
    kind = {1: "u", 2: "i", 3: "f"}.get(tags.get(339, (1,))[0], "?")
    compression, predictor, planar = tags.get(259, 1), tags.get(317, 1), tags.get(284, 1)
    if compression not in OWN or predictor not in (1, 2, 3) or bits not in (1, 8, 16, 32, 64) or kind == "?":
        raise DataError(f"{path}: {bands} bands of {bits} bits, TIFF compression {compression}, predictor "
                        f"{predictor}: read here uncompressed, deflate or LZW only (convert it, e.g. "
                        "gdal_translate -co COMPRESS=DEFLATE in.tif out.tif)")
    check_size(path, w, h, bands, max(bits // 8, 1))
    tiled = 322 in tags
    bw, bh = (tags[322], tags[323]) if tiled else (w, min(tags.get(278, h), h))
    offsets, counts = (tags[324], tags[325]) if tiled else (tags[273], tags[279])
    s = bands if planar == 1 else 1  # samples per pixel in one block
    across, per_plane = math.ceil(w / bw), math.ceil(w / bw) * math.ceil(h / bh)
    if len(offsets) < per_plane * bands // s or len(counts) != len(offsets):
        raise DataError(f"{path}: damaged TIFF: {len(offsets)} blocks of pixels, its size needs "
                        f"{per_plane * bands // s}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        order = "<" if f.read(2) == b"II" else ">"
        dtype = np.dtype(np.uint8 if bits == 1 else kind + str(bits // 8)).newbyteorder(order)
        out = np.empty((h, w, bands), dtype)
        for k in range(per_plane * bands // s):
            plane, block = divmod(k, per_plane)
            y0, x0 = block // across * bh, block % across * bw
            rows = bh if tiled else min(bh, h - y0)  # the last strip may be short
            row_bytes = math.ceil(bw * s * bits / 8)
            if offsets[k] + counts[k] > size:
                raise DataError(f"{path}: damaged TIFF: block {k} lies past the end of the file")
            f.seek(offsets[k])
            raw = decompress(f.read(counts[k]), compression, rows * row_bytes, row_bytes)
            if len(raw) < rows * row_bytes:
                raise DataError(f"{path}: damaged TIFF: block {k} holds {len(raw)} bytes of "
                                f"{rows * row_bytes}")
            block = unpredict(raw[: rows * row_bytes], predictor, dtype, rows, bw, s, bits)
            rows, cols = min(rows, h - y0), min(bw, w - x0)
            out[y0 : y0 + rows, x0 : x0 + cols, plane * s : plane * s + s] = block[:rows, :cols]
    return out.astype(out.dtype.newbyteorder("="), copy=False)  # torch takes this machine's byte order only


def decompress(raw, compression, need, width):
    """A block's bytes as stored -> at most `need` bytes of samples (a deflate bomb stops there)."""
    if OWN[compression] == "deflate":
        return zlib.decompressobj().decompress(raw, need)
    if OWN[compression] == "LZW":  # Pillow's libtiff decodes it, once wrapped as a TIFF of one 8-bit band
        rows = math.ceil(need / width)
        tags = [(256, width), (257, rows), (258, 8), (259, 5), (262, 1), (273, 122), (277, 1), (278, rows),
                (279, len(raw))]  # 122 = the 8-byte header, then 2 + 9 x 12 + 4 bytes of tags
        ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, 4, 1, v) for t, v in tags)
        with Image.open(io.BytesIO(b"II*\0" + struct.pack("<I", 8) + ifd + bytes(4) + raw)) as im:
            return im.tobytes()
    return raw


def unpredict(raw, predictor, dtype, rows, width, s, bits):
    """Decoded bytes -> (rows, width, s) samples, the predictor undone: 2 stored each sample as its
    difference to the one on its left; 3 (floating point) split each row's samples into byte planes,
    most significant first, then took differences of neighbouring bytes."""
    if bits == 1:  # 1-bit, each row padded to a whole byte
        flat = np.unpackbits(np.frombuffer(raw, np.uint8).reshape(rows, -1), axis=1)[:, : width * s]
        return flat.reshape(rows, width, s)
    if predictor == 3:  # the byte differences run along each pixel's s samples, as libtiff writes them
        planes = np.cumsum(np.frombuffer(raw, np.uint8).reshape(rows, -1, s), axis=1, dtype=np.uint8)
        planes = planes.reshape(rows, dtype.itemsize, width * s).transpose(0, 2, 1)
        return np.ascontiguousarray(planes).view(dtype.newbyteorder(">")).reshape(rows, width, s)
    block = np.frombuffer(raw, dtype).reshape(rows, width, s)
    return np.cumsum(block, axis=1, dtype=dtype) if predictor == 2 else block
