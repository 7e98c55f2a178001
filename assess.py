"""How accurate a map is, and how much of each class there really is: a stratified random sample of its
pixels for a person to label, then accuracy and error-adjusted areas with their 95% intervals, by the
good practices of Olofsson, Foody, Herold, Stehman, Woodcock, Wulder (2014), Remote Sensing of
Environment 148, 42-57. The strata are the map classes i; j and k are reference classes (the labels):

    W_i = N_i / N                    share of the map's N pixels mapped as i; n_ij points of stratum i
    p_ij = W_i n_ij / n_i.           (eq. 4) the error matrix in estimated area proportions
    O = sum_j p_jj                   (eq. 1) overall accuracy
    U_i = p_ii / p_i.                (eq. 2) user's accuracy: of the area mapped as i, the share that is i
    P_j = p_jj / p_.j                (eq. 3) producer's accuracy: of the area that is j, the share mapped j
    V(O) = sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)                                         (eq. 5)
    V(U_i) = U_i (1 - U_i) / (n_i. - 1)                                                  (eq. 6)
    V(P_j) = [N_j^2 (1 - P_j)^2 U_j (1 - U_j) / (n_j. - 1)
              + P_j^2 sum_{i != j} N_i^2 (n_ij / n_i.) (1 - n_ij / n_i.) / (n_i. - 1)] / N_.j^2 (eq. 7)
    N_.j = sum_i N_i n_ij / n_i.     (eq. 8) the pixels that are j, estimated
    p_.k = sum_i W_i n_ik / n_i.     (eq. 9) the share of the map that is k, estimated
    S(p_.k) = sqrt(sum_i W_i^2 (n_ik / n_i.) (1 - n_ik / n_i.) / (n_i. - 1))             (eq. 10)
    A_k = A p_.k,  S(A_k) = A S(p_.k)   (eq. 11) error-adjusted area; 95% interval: estimate +- 1.96 S

    python assess.py sample MAPS --size 600    # MAPS/sample.csv to label, strata.json, sample.geojson
    python assess.py sample MAPS --size 600 --aoi area.gpkg   # the map inside an area of interest only
    python assess.py estimate MAPS             # MAPS/accuracy.json: mapped area against estimated area
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from support import IGNORE, layers, rasters
from support.cli import DataError, command_line, written
from support.clicks import read_table, text_cell, write_points_geojson

Z95 = 1.96  # a 95% interval is the estimate +- 1.96 standard errors
UNSURE = "?"  # the class of a sample point the person cannot tell: left out of the estimate, and reported
STRIP = 256  # rows of a mask looked at together: a big mask is counted and searched strip by strip


def stratified(counts, mapped):
    """Olofsson et al. (2014) eqs. 1-11 -> dict of arrays (nan where a figure has no sample to tell).

    counts: (C, C) sample points, rows i = map class, columns j = reference class; mapped: (C,) pixels
    mapped per class (N_i). Proportions of the map: multiply `area` and `area_se` by its area A."""
    n, N = np.asarray(counts, float), np.asarray(mapped, float)
    ni = n.sum(1)  # (C,) points per stratum, n_i.
    W = N / N.sum()
    q = np.divide(n, ni[:, None], out=np.zeros_like(n), where=ni[:, None] > 0)  # n_ij / n_i.
    # q_ij (1 - q_ij) / (n_i. - 1): the variance of the share q_ij, the term of eqs. 5, 6, 7 and 10; 0 for a
    # stratum sampled whole (a class mapped on a few pixels, every one labelled): nothing is left to chance
    sampled = (ni > 1) & (ni < N)
    var = np.divide(q * (1 - q), ni[:, None] - 1, out=np.zeros_like(n), where=sampled[:, None])
    p = W[:, None] * q  # eq. 4
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: no point, or a class nobody found
        users, producers = np.diag(p) / p.sum(1), np.diag(p) / p.sum(0)  # eqs. 2, 3
        Nj = (N[:, None] * q).sum(0)  # eq. 8
        others = (N[:, None] ** 2 * var).sum(0) - N**2 * np.diag(var)  # the sum over i != j of eq. 7
        var_p = (N**2 * (1 - producers) ** 2 * np.diag(var) + producers**2 * others) / Nj**2  # eq. 7
    return {"matrix": p, "overall": np.trace(p), "overall_se": np.sqrt((W**2 * np.diag(var)).sum()),  # 1, 5
            "users": users, "users_se": np.sqrt(np.diag(var)),  # eq. 6: U_i = q_ii
            "producers": producers, "producers_se": np.sqrt(var_p),
            "area": p.sum(0), "area_se": np.sqrt((W[:, None] ** 2 * var).sum(0))}  # eqs. 9, 10


def allocate(pixels, size, least=50):
    """Points per stratum, as Olofsson et al. (2014) recommend: each class `least` (or all its pixels,
    if fewer), the rest in proportion to the pixels mapped (largest remainders); never more than pixels."""
    pixels = np.asarray(pixels, np.int64)
    n = np.minimum(pixels, least)
    while n.sum() < size:
        room = pixels - n  # the classes that still have pixels to give take the rest
        share = (size - n.sum()) * room / room.sum()
        extra = np.floor(share).astype(np.int64)
        left = size - n.sum() - extra.sum()
        extra[np.argsort(extra - share, kind="stable")[:left]] += 1  # the largest remainders
        n = n + np.minimum(extra, room)
    return n


def read_mask(path, aoi=None):
    """A palette mask as predict.py writes it -> (H, W) uint8: class index, IGNORE where no data and
    outside the area of interest `aoi` (layers.read_aoi) where one is given."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a mapped orthomosaic may be larger
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: a {im.mode} image, not a mask written by predict.py (palette)")
            mask = np.asarray(im)
    except OSError as e:
        raise DataError(f"{path}: cannot read mask ({getattr(e, 'strerror', None) or e})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if aoi is None:
        return mask
    (w, h), geo = rasters.image_info(path)
    return np.where(layers.inside(layers.laid_on(aoi, geo, path), geo, (0, h), (0, w)), mask, IGNORE)


def within(maps, images, aoi):
    """--aoi: each mask's pixels per class inside the area of interest, in place of those of areas.csv, and
    their hectares at each mask's hectares per pixel; masks not on the map are left out, in one line."""
    out, off = [], [image for image, mask, _, _ in images if rasters.image_info(Path(maps) / mask)[1] is None]
    for image, mask, px, ha in [i for i in images if i[0] not in off]:
        inside = class_counts(read_mask(Path(maps) / mask, aoi), len(px)).tolist()
        out.append((image, mask, inside, ha and [n * sum(ha) / max(sum(px), 1) for n in inside]))
    inside, mapped = sum(sum(i[2]) for i in out), sum(sum(i[2]) for i in images)
    print(f"--aoi {aoi['name']}: {inside} of the {mapped} mapped pixels lie inside it" +
          (f"; not on the map, left out: {', '.join(off)}" if off else ""))
    return out


def read_areas(maps):
    """MAPS/areas.csv -> (class names, [(image, mask name, pixels per class, hectares per class or None)])."""
    path = Path(maps) / "areas.csv"
    images = {}  # (image, mask) -> [(class, pixels, hectares or None)]
    if not path.exists():
        raise DataError(f"{path}: not found (map images with predict.py --out {maps} first)")
    try:
        for r in read_table(path)[0]:
            row = (r["class"], int(r["pixels"]), float(r["hectares"]) if r["hectares"] else None)
            images.setdefault((r["image"], r["mask"]), []).append(row)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: expected the columns image,class,pixels,share,hectares,mask of predict.py")
    out, classes = [], None
    for (image, mask), rows in images.items():
        names, pixels, hectares = zip(*rows)
        if classes is not None and list(names) != classes:
            raise DataError(f"{path}: {image} has other classes than {out[0][0]}")
        if not (Path(maps) / mask).exists():
            raise DataError(f"{Path(maps) / mask}: not found (the mask of {image} in {path})")
        classes = list(names)
        out.append((image, mask, list(pixels), None if None in hectares else list(hectares)))
    if not out:
        raise DataError(f"{path}: no mapped image")
    return classes, out


def hectares_per_pixel(images):
    """One pixel's area in hectares when every scene has one and they agree within 1%, else None."""
    sizes = [sum(ha) / sum(px) for _, _, px, ha in images if ha is not None and sum(px)]
    if len(sizes) < len(images) or not sizes or max(sizes) > 1.01 * min(sizes):
        return None
    return sum(sum(ha) for *_, ha in images) / sum(sum(px) for _, _, px, _ in images)


def draw(maps, images, n, rng, aoi=None):
    """Stratified random sampling: n[c] distinct pixels of class c among all the masks' pixels of c,
    each equally likely -> [(image, x, y)] in a random order. One mask, one strip of it at a time."""
    pixels = np.sum([px for _, _, px, _ in images], axis=0)
    ranks = [np.sort(rng.choice(pixels[c], n[c], replace=False)) for c in range(len(n))]  # c's k-th pixels
    seen = np.zeros(len(n), np.int64)  # pixels of each class in the masks before this strip
    points = []
    for image, mask, px, _ in images:
        m = read_mask(Path(maps) / mask, aoi)
        for y0 in range(0, len(m), STRIP):
            strip = m[y0 : y0 + STRIP]
            found = np.bincount(strip.ravel(), minlength=256)[: len(n)]
            for c in range(len(n)):
                lo, hi = np.searchsorted(ranks[c], [seen[c], seen[c] + found[c]])
                if hi > lo:  # the k-th pixel of c in raster order is among this strip's
                    at = np.flatnonzero(strip == c)[ranks[c][lo:hi] - seen[c]]
                    points += [(image, int(i % m.shape[1]), int(y0 + i // m.shape[1])) for i in at]
            seen += found
        check_counts(m, px, mask, "areas.csv")
    return [points[i] for i in rng.permutation(len(points))]  # mixed, so that no stratum shows in the order


def check_counts(mask, pixels, name, table):
    """Refuse a mask whose pixels per class are not those counted when the sample was drawn."""
    if list(class_counts(mask, len(pixels))) != list(pixels):
        raise DataError(f"{name}: its pixels per class differ from those in {table} (mapped again since?)")


def class_counts(mask, n):
    """Pixels of each of n classes in a mask, a strip at a time (np.bincount copies what it counts)."""
    strips = range(0, len(mask), STRIP)
    return sum(np.bincount(mask[y : y + STRIP].ravel(), minlength=256) for y in strips)[:n]


def sample(args):
    maps = Path(args.maps)
    aoi = layers.read_aoi(args.aoi) if args.aoi else None
    classes, images = read_areas(maps)
    if aoi is not None:
        images = within(maps, images, aoi)
    pixels = np.sum([px for _, _, px, _ in images], axis=0)
    least = np.minimum(pixels, args.min_per_class).sum()
    if args.size < least:
        raise DataError(f"--size {args.size}: fewer than the minimum, {args.min_per_class} points for each "
                        f"of {(pixels > 0).sum()} mapped classes ({least})")
    if args.size > pixels.sum():
        raise DataError(f"--size {args.size}: more points than the {pixels.sum()} mapped pixels")
    for old in (maps / "sample.csv", maps / "sample.geojson"):  # a person's work is never overwritten
        if old.exists() and any(r[5] for r in read_labels([old])):
            raise DataError(f"{old}: already holds labelled points; move it away to draw a new sample")
    out = maps / "sample.csv"
    n = allocate(pixels, args.size, args.min_per_class)
    points = draw(maps, images, n, np.random.default_rng(args.seed), aoi)
    with written(out) as tmp, open(tmp, "w", newline="") as f:  # no mapped class in it: a person labels blind
        csv.writer(f).writerows([("image", "x", "y", "class", "sample")] +
                                [(text_cell(im), x, y, "", k) for k, (im, x, y) in enumerate(points, 1)])
    files = [out, write_geojson(maps, images, points)]
    ha = hectares_per_pixel(images)
    strata = {"seed": args.seed, "size": args.size, "min_per_class": args.min_per_class, "aoi": args.aoi,
              "classes": classes,
              "pixels": pixels.tolist(), "hectares": None if ha is None else (pixels * ha).tolist(),
              "hectares_per_pixel": ha, "points": n.tolist(),
              "masks": [{"image": im, "mask": m, "pixels": px} for im, m, px, _ in images],
              "sample": [list(p) for p in points]}  # sample k is the (k-1)-th: image, x, y
    with written(maps / "strata.json") as tmp:
        tmp.write_text(json.dumps(strata, indent=1))
    print(f"{'class':<24}{'pixels mapped':>15}{'hectares':>12}{'points':>8}   (seed {args.seed})")
    for c, name in enumerate(classes):
        print(f"{name:<24}{pixels[c]:>15}{'' if ha is None else f'{pixels[c] * ha:.2f}':>12}{n[c]:>8}")
    files = ", ".join(str(p) for p in files + [maps / "strata.json"] if p)
    print(f"{len(points)} points -> {files}: fill in 'class' (names as in areas.csv), then "
          f"python assess.py estimate {maps}")
    return 0


def write_geojson(maps, images, points):
    """The points in longitude and latitude, for the scenes whose mask is on the map -> path, or None."""
    geos = {im: rasters.image_info(Path(maps) / m)[1] for im, m, _, _ in images}
    points = [(im, x, y, {"image": im, "x": x, "y": y, "class": "", "sample": k})
              for k, (im, x, y) in enumerate(points, 1)]
    return write_points_geojson(Path(maps) / "sample.geojson", points, geos)


def read_labels(paths):
    """Labelled sample files (CSV image,x,y,class,sample, or the GeoJSON of `sample` with its properties
    filled in) -> [(where, sample number, image, x, y, class as written)]."""
    rows = []
    for path in map(Path, paths):
        try:
            if path.suffix.lower() in (".geojson", ".json"):
                records = [f["properties"] for f in json.loads(path.read_text())["features"]]
                wheres = [f"{path}: feature {k}" for k in range(len(records))]
            else:  # as a spreadsheet saved it, too
                records = read_table(path)[0]
                wheres = [f"{path}:{line}" for line in range(2, len(records) + 2)]
        except FileNotFoundError:
            raise DataError(f"{path}: not found")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a sample file of assess.py ({type(e).__name__}: {e})")
        for where, r in zip(wheres, records):
            try:
                label = "" if r.get("class") is None else str(r["class"]).strip()
                rows.append((where, int(r["sample"]), r["image"], int(r["x"]), int(r["y"]), label))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}: expected image,x,y,class,sample with whole numbers x, y, sample")
    return rows


def estimate(args):
    maps = Path(args.maps)
    path = maps / "strata.json"
    try:
        strata = json.loads(path.read_text())
        classes, drawn, masks = strata["classes"], strata["sample"], strata["masks"]
    except FileNotFoundError:
        raise DataError(f"{path}: not found (draw the sample with: python assess.py sample {maps} --size N)")
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a strata table written by assess.py sample")
    files = args.sample or [maps / "sample.csv"]
    rows = read_labels(files)
    index, seen = {name: i for i, name in enumerate(classes)}, set()
    for where, k, image, x, y, label in rows:
        if not 1 <= k <= len(drawn) or k in seen:
            raise DataError(f"{where}: sample {k} is {'twice' if k in seen else 'not in ' + str(path)}")
        if image not in {m["image"] for m in masks}:
            raise DataError(f"{where}: image {image!r} is not one of the masks of {path}")
        if label and label != UNSURE and label not in index:
            raise DataError(f"{where}: class {label!r} is not a class of the map ({', '.join(classes)}), nor "
                            f"{UNSURE} (a point the person cannot tell)")
        seen.add(k)
    unlabelled = len(drawn) - sum(bool(r[5]) for r in rows)
    if unlabelled:
        raise DataError(f"{unlabelled} of the {len(drawn)} points of {path} have no class yet in "
                        f"{', '.join(map(str, files))}: label every point (the estimate needs them all)")
    aoi = layers.read_aoi(strata["aoi"]) if strata.get("aoi") else None  # as the sample was drawn
    mapped = lookup(maps, masks, rows, aoi)
    for where, k, image, x, y, _ in rows:
        if [image, x, y] != drawn[k - 1]:
            raise DataError(f"{where}: sample {k} is {image} ({x}, {y}), but {drawn[k - 1][0]} "
                            f"({drawn[k - 1][1]}, {drawn[k - 1][2]}) in {path}")
    told = [r[5] != UNSURE for r in rows]  # the points the person could not tell stay out, and are reported
    counts, unsure = np.zeros((len(classes), len(classes)), np.int64), np.zeros(len(classes), np.int64)
    np.add.at(counts, (mapped[told], [index[r[5]] for r, t in zip(rows, told) if t]), 1)
    np.add.at(unsure, mapped[~np.array(told)], 1)
    pixels = np.asarray(strata["pixels"])
    few = [f"{name} {n}" for name, n, N in zip(classes, counts.sum(1), pixels) if 0 < N and n < min(N, 2)]
    if few:
        raise DataError(f"{path}: a stratum needs 2 points or more for a variance (or all its pixels); "
                        f"points of {', '.join(few)}")
    result = report(stratified(counts, pixels), counts, unsure, strata, files)
    with written(maps / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"-> {maps / 'accuracy.json'}")
    return 0


def lookup(maps, masks, rows, aoi=None):
    """The map class at each labelled point, read again in the masks (as they were when drawn from)."""
    mapped = np.zeros(len(rows), np.int64)
    for m in masks:
        mask = read_mask(Path(maps) / m["mask"], aoi)
        check_counts(mask, m["pixels"], Path(maps) / m["mask"], "strata.json")
        for k, (where, _, image, x, y, _) in enumerate(rows):
            if image == m["image"]:
                if not (0 <= x < mask.shape[1] and 0 <= y < mask.shape[0]) or mask[y, x] == IGNORE:
                    raise DataError(f"{where}: ({x}, {y}) is on no data (or off) in {m['mask']}")
                mapped[k] = mask[y, x]
    return mapped


def interval(estimate, se, scale=1.0):
    """-> {estimate, se, ci95: [low, high]}, times `scale`; None where there is nothing to tell. A share
    lies between 0 and 1 (an area between 0 and the map's): its interval is cut there."""
    e, s = float(estimate * scale), float(se * scale)
    ci = [max(e - Z95 * s, 0.0), min(e + Z95 * s, scale)]
    return {"estimate": e, "se": s, "ci95": ci} if np.isfinite(e) else None


def report(r, counts, unsure, strata, files):
    """The estimates -> the dict written to accuracy.json; areas in hectares, or in pixels if unknown."""
    ha, pixels = strata["hectares_per_pixel"], strata["pixels"]
    classes = {name: {"mapped_area": pixels[c] * (ha or 1), "points": int(counts[c].sum()),
                      "points_unsure": int(unsure[c]),
                      "estimated_area": interval(r["area"][c], r["area_se"][c], sum(pixels) * (ha or 1)),
                      "users_accuracy": interval(r["users"][c], r["users_se"][c]),
                      "producers_accuracy": interval(r["producers"][c], r["producers_se"][c])}
               for c, name in enumerate(strata["classes"])}
    return {"method": "stratified estimation, Olofsson et al. (2014) eqs. 1-11; ci95 = estimate +- 1.96 se",
            "unit": "hectares" if ha else "pixels", "sample": list(map(str, files)), "seed": strata["seed"],
            "points": int(counts.sum()), "overall_accuracy": interval(r["overall"], r["overall_se"]),
            "classes": classes, "error_matrix": {"rows": "map class", "columns": "reference class (labels)",
                                                 "area_proportions": r["matrix"].tolist(),
                                                 "points": counts.tolist()}}


def print_report(result):
    def ci(v, digits):
        if v is None:
            return "-"
        (low, high), d = v["ci95"], digits
        return f"{v['estimate']:.{d}f} ({low:.{d}f}-{high:.{d}f})"

    unit, digits = result["unit"], 2 if result["unit"] == "hectares" else 0
    print(f"{result['points']} labelled points, seed {result['seed']}; each estimate with its 95% interval")
    print(f"{'class':<22}{'mapped ' + unit:>16}{'estimated ' + unit + ' (error-adjusted)':>40}"
          f"{'user accuracy':>22}{'producer accuracy':>22}")
    for name, c in result["classes"].items():
        print(f"{name:<22}{c['mapped_area']:>16.{digits}f}{ci(c['estimated_area'], digits):>40}"
              f"{ci(c['users_accuracy'], 3):>22}{ci(c['producers_accuracy'], 3):>22}")
    print(f"overall accuracy {ci(result['overall_accuracy'], 3)}")
    unsure = [f"{n} {c['points_unsure']}" for n, c in result["classes"].items() if c["points_unsure"]]
    if unsure:
        print(f"points the person could not tell ({UNSURE}), left out of the estimate, by map class: "
              f"{', '.join(unsure)}")
    names = list(result["classes"])
    print("error matrix in area proportions (rows: map class, columns: reference class):")
    print(" " * 22 + "".join(f"{n[:8]:>9}" for n in names))
    for name, row in zip(names, result["error_matrix"]["area_proportions"]):
        print(f"  {name:<20}" + "".join(f"{v:>9.4f}" for v in row))


def main(argv=None):
    p = argparse.ArgumentParser(description="Accuracy and area of a map from a stratified random sample "
                                "of its pixels (Olofsson et al. 2014).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw the points for a person to label -> MAPS/sample.csv, strata.json")
    s.add_argument("maps", help="the --out folder of predict.py: masks and areas.csv")
    s.add_argument("--size", type=int, required=True, help="number of points in all, e.g. 600")
    s.add_argument("--min-per-class", type=int, default=50,
                   help="points per mapped class at least, all its pixels if fewer (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed, kept in strata.json (default: %(default)s)")
    s.add_argument("--aoi", metavar="FILE", help="an area of interest, a layer of polygons (GeoJSON, "
                   "GeoPackage, shapefile, KML, FlatGeobuf): only the map inside it is sampled and "
                   "estimated; kept in strata.json")
    e = sub.add_parser("estimate", help="accuracy and areas from the labelled sample -> MAPS/accuracy.json")
    e.add_argument("maps", help="the folder that `sample` wrote to")
    e.add_argument("--sample", nargs="+", default=None,
                   help="the labelled sample: CSV or GeoJSON files, together (default: MAPS/sample.csv)")
    args = p.parse_args(argv)
    if args.command == "estimate":
        return estimate(args)
    for flag, value, least in [("--size", args.size, 1), ("--min-per-class", args.min_per_class, 2),
                               ("--seed", args.seed, 0)]:  # 2 per class: a stratum's variance needs them
        if value < least:
            raise DataError(f"{flag} {value}: must be {least} or more")
    return sample(args)


if __name__ == "__main__":
    sys.exit(command_line(main))
