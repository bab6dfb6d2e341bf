"""Data for cka-geo: the embedded Sentinel-2 scene, derived labels, users' data loaders.

* :mod:`cka_geo.data.embedded`: the 640 x 640 training crop of the packaged 13-band
  Sentinel-2 L1C scene (:mod:`cka_geo.data.scene`) and its tiles (:class:`EmbeddedS2Tiles`).
* :mod:`cka_geo.data.probes`: the default probe set (:func:`probe_images`), distinct crops
  of the whole scene (:func:`distinct_crops`).
* :mod:`cka_geo.data.labels`: labels derived from spectral indices (NDWI, NDVI).
* Users' data (:mod:`cka_geo.data.folders` gathers them): :mod:`~cka_geo.data.readers`
  (one .tif/.npy file), :mod:`~cka_geo.data.imagefolder` (tile folders, array probe sets,
  batching), :mod:`~cka_geo.data.sen1floods11` and :mod:`~cka_geo.data.pastis` (layouts);
  :mod:`~cka_geo.data.layouts` (labelled datasets in any of them, split for training).

Only numpy and torch are imported here; tifffile is imported where a .tif is read.
See docs/data.md.
"""

from __future__ import annotations

from cka_geo.data.embedded import (
    BAND_NAMES,
    BAND_SELECTIONS,
    EmbeddedS2Tiles,
    band_statistics,
    embedded_cover_map,
    load_embedded_scene,
    select_bands,
)
from cka_geo.data.folders import (
    ImageFolder,
    PastisLike,
    Sen1Floods11,
    evenly_spaced_frames,
    load_array_probes,
    read_image,
)
from cka_geo.data.layouts import UserData, open_user_data
from cka_geo.data.probes import distinct_crops, iter_probe_batches, probe_images

__all__ = [
    "BAND_NAMES",
    "BAND_SELECTIONS",
    "EmbeddedS2Tiles",
    "ImageFolder",
    "PastisLike",
    "Sen1Floods11",
    "UserData",
    "band_statistics",
    "distinct_crops",
    "embedded_cover_map",
    "evenly_spaced_frames",
    "iter_probe_batches",
    "load_array_probes",
    "load_embedded_scene",
    "open_user_data",
    "probe_images",
    "read_image",
    "select_bands",
]
