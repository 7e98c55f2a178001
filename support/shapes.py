"""Drawn labels rasterised: the pixels a polygon (holes respected) or a line of some width labels, the
checks a GeoJSON geometry or a CSV's stroke must pass first, and one class per pixel where labels overlap.

Pixel coordinates are rasters.map_to_pixel's: (column, row), the centre of pixel (i, j) at (i, j), the
pixel spanning i - 0.5 .. i + 0.5 (GDAL's pixel corners, shifted by -0.5). A polygon labels the pixels
whose centre lies inside it, by the even-odd rule, so a ring inside another is a hole; a centre exactly
on an edge is inside on a left or top edge and outside on a right or bottom one, so polygons that share
an edge never claim the same pixel and leave none between them. A line labels the pixels whose centre
lies within half its width of it (round ends). Not Pillow's ImageDraw (13.0): it cuts each vertex to whole
pixels and fills the pixels on the outline too, so the square from (1.6, 1.6) to (5.6, 5.6), which
holds 4x4 centres, fills 5x5 pixels.
"""
import math

import numpy as np

from support.cli import DataError

KINDS = ["LineString", "MultiLineString", "Polygon", "MultiPolygon"]  # the GeoJSON geometries drawn


def polygon_pixels(rings, size):
    """Rings [(N, 2) arrays of (column, row), first position == last] of one polygon -> (columns, rows)
    of the pixels of a (w, h) image whose centre lies inside. A scanline through each row of pixel
    centres: a pixel is inside when an odd number of edges cross the row to its right."""
    w, h = size
    edges = np.concatenate([np.stack([r[:-1], r[1:]], 1) for r in rings])  # (E, 2 ends, xy)
    x1, y1, x2, y2 = edges[:, 0, 0], edges[:, 0, 1], edges[:, 1, 0], edges[:, 1, 1]
    top, bottom = max(math.ceil(edges[..., 1].min()), 0), min(math.floor(edges[..., 1].max()), h - 1)
    left, right = max(math.floor(edges[..., 0].min()), 0), min(math.ceil(edges[..., 0].max()), w - 1)
    if top > bottom or left > right:
        return np.zeros(0, int), np.zeros(0, int)
    # the rows an edge crosses: y1 <= row < y2 or y2 <= row < y1 (half-open: a vertex counts once)
    first = np.clip(np.ceil(np.minimum(y1, y2)), top, bottom + 1).astype(int)
    last = np.clip(np.ceil(np.maximum(y1, y2)), top, bottom + 1).astype(int)  # one past the last row
    counts = last - first
    edge = np.repeat(np.arange(len(edges)), counts)  # one (edge, row) pair per crossing
    row = first[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(counts) - counts, counts)
    cross = x1[edge] + (row - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
    # a crossing at x toggles the pixels of its row from column ceil(x) on; counted within the window
    n_rows, n_cols = bottom - top + 1, right - left + 1
    at = np.clip(np.ceil(cross) - left, 0, n_cols).astype(int)
    toggles = np.bincount((row - top) * (n_cols + 1) + at, minlength=n_rows * (n_cols + 1))
    passed = np.cumsum(toggles.reshape(n_rows, n_cols + 1), axis=1)[:, :n_cols]  # crossings at x <= column
    per_row = np.bincount(row - top, minlength=n_rows)[:, None]
    rows, cols = np.nonzero((per_row - passed) % 2 == 1)  # odd number of crossings to the right
    return cols + left, rows + top


def line_pixels(line, width, size):
    """A polyline, (N, 2) array of (column, row) -> (columns, rows) of the pixels of a (w, h) image whose
    centre lies within width / 2 of it."""
    w, h, half = *size, width / 2
    found = [np.zeros(0, int)]
    for a, b in zip(line[:-1], line[1:]):
        steps = max(1, math.ceil(np.hypot(*(b - a)) / 64))  # long segments in pieces: small windows
        for k in range(steps):
            p, q = a + (b - a) * k / steps, a + (b - a) * (k + 1) / steps
            c0, c1 = max(math.ceil(min(p[0], q[0]) - half), 0), min(math.floor(max(p[0], q[0]) + half), w - 1)
            r0, r1 = max(math.ceil(min(p[1], q[1]) - half), 0), min(math.floor(max(p[1], q[1]) + half), h - 1)
            if c0 > c1 or r0 > r1:
                continue
            cols, rows = np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1))
            d = q - p
            t = np.clip(((cols - p[0]) * d[0] + (rows - p[1]) * d[1]) / max(d @ d, 1e-12), 0, 1)
            near = (cols - p[0] - t * d[0]) ** 2 + (rows - p[1] - t * d[1]) ** 2 <= half * half
            found.append(rows[near] * w + cols[near])
    index = np.unique(np.concatenate(found))
    return index % w, index // w


def pixels(kind, parts, size, line_width):
    """A shape's parts in pixel coordinates -> (columns, rows) it labels on a (w, h) image, each once.
    kind: 'Polygon' or 'MultiPolygon' (parts: polygons, each its rings), else a line (parts: [line])."""
    w = size[0]
    polygon = kind.endswith("Polygon")
    found = [polygon_pixels(p, size) if polygon else line_pixels(p[0], line_width, size) for p in parts]
    index = np.unique(np.concatenate([rows * w + cols for cols, rows in found]))
    return index % w, index // w


def moved(parts, move):
    """Shape parts with every vertex moved by move((M, 2) array) -> (M, 2) array, in one call."""
    flat = [a for piece in parts for a in piece]
    pieces = iter(np.split(move(np.concatenate(flat)), np.cumsum([len(a) for a in flat])[:-1]))
    return [[next(pieces) for _ in piece] for piece in parts]


def drawn_rows(kind, positions, info, line_width):
    """One stroke or polygon of a pixel CSV, [(where, image, x, y, class)] -> a row for each pixel it
    labels, on its image, clipped to it."""
    where, name, _, _, value = positions[0]
    other = next((p[0] for p in positions if (p[1], p[4]) != (name, value)), None)
    if other:
        raise DataError(f"{other}: the rows of one {kind} must name one image and one class ({where} names "
                        f"{name}, {value!r})")
    xy = np.array([(x, y) for _, _, x, y, _ in positions], float)
    if kind == "polygon" and len(xy) < 3:
        raise DataError(f"{where}: a polygon of {len(xy)} row(s); it needs 3 positions at least")
    parts = [[np.vstack([xy, xy[-1:]])]] if kind == "stroke" else [[np.vstack([xy, xy[:1]])]]  # a stroke
    # of one row (a short drag on the page) is a dot of --line-width
    cols, rows = pixels("LineString" if kind == "stroke" else "Polygon", parts, info[name][0], line_width)
    if not len(cols):
        raise DataError(f"{where}: the {kind} covers no pixel of {name}")
    return [(where, name, c, r, value) for c, r in zip(cols.tolist(), rows.tolist())]


def one_class_per_pixel(by_image):
    """{image name: [(x, y, class)]} -> the same with each pixel once: a pixel labelled twice with one class
    keeps one label, a pixel claimed by two classes or more (overlapping shapes, a click on a shape of
    another class) is left without a label (data.IGNORE), and one line counts them."""
    out, conflicts = {}, 0
    for name, labels in by_image.items():
        seen = {}  # (x, y) -> class, or -1 once two classes claim it
        for x, y, c in labels:
            seen[x, y] = c if seen.get((x, y), c) == c else -1
        conflicts += sum(c < 0 for c in seen.values())
        kept = [(x, y, c) for (x, y), c in seen.items() if c >= 0]
        if kept:
            out[name] = kept
    if conflicts:
        print(f"{conflicts} pixel(s) claimed by two classes or more are left without a label")
    return out


def check_geometry(kind, coords, where):
    """A GeoJSON Polygon, MultiPolygon, LineString or MultiLineString's coordinates (lists; tuples as
    shapely gives them) -> its parts, each a list of (N, 2) arrays: a polygon's rings (the outer one, then
    its holes), or one line. Empty coordinates, a ring that is not closed or of fewer than 4 positions, a
    line of fewer than 2: one line."""
    if not isinstance(coords, (list, tuple)) or not coords:
        raise DataError(f"{where}: a {kind} with empty coordinates ({coords!r:.40})")
    parts = {"Polygon": [coords], "MultiPolygon": coords, "LineString": [[coords]],
             "MultiLineString": [[line] for line in coords]}[kind]  # polygons (their rings), or [line]
    out = []
    for i, part in enumerate(parts):
        if not isinstance(part, (list, tuple)) or not part:
            raise DataError(f"{where}: a {kind} with empty coordinates (part {i})")
        out.append([])
        for j, positions in enumerate(part):
            what = {"Polygon": f"ring {j} of the Polygon", "MultiPolygon": f"ring {j} of polygon {i} of the "
                    "MultiPolygon", "LineString": "the LineString", "MultiLineString": f"line {i} of the "
                    "MultiLineString"}[kind]
            a = position_array(positions, f"{where}: {what}")
            if kind.endswith("LineString") and len(a) < 2:
                raise DataError(f"{where}: {what} has {len(a)} position(s); a line needs 2 at least")
            if kind.endswith("Polygon") and len(a) < 4:
                raise DataError(f"{where}: {what} has {len(a)} position(s); a closed ring needs 4 at least "
                                "(its first repeated at the end)")
            if kind.endswith("Polygon") and not (a[0] == a[-1]).all():
                raise DataError(f"{where}: {what} is not closed: its first position {tuple(a[0].tolist())} "
                                f"is not its last {tuple(a[-1].tolist())}")
            out[-1].append(a)
    return out


def position_array(positions, where):
    """GeoJSON positions [[x, y, (z)], ...] -> (N, 2) float array; anything else is one line."""
    if not isinstance(positions, (list, tuple)) or not positions:
        raise DataError(f"{where}: empty coordinates ({positions!r:.40})")
    try:
        a = np.array([[float(p[0]), float(p[1])] for p in positions])
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(f"{where}: coordinates {positions!r:.60} are not a list of number pairs")
    if not np.isfinite(a).all():
        bad = a[~np.isfinite(a).all(axis=1)][0]
        raise DataError(f"{where}: coordinates ({bad[0]}, {bad[1]}) are not finite numbers")
    return a
