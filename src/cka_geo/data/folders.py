"""Loaders for users' data: tile folders, array probe sets, Sen1Floods11, PASTIS-like.

Conventions shared by every loader here:

* Images come out as float32 tensors (C, H, W) (time series: (T, C, H, W)), in the file's
  band order, optionally normalised with user-given per-band ``mean``/``std``.
* Supported image files: ``.tif``/``.tiff`` (read with tifffile, imported on first use) and
  ``.npy`` (numpy). A 2-D array is one band. A 3-D array is (C, H, W) or (H, W, C): with an
  expected band count the axis that has it is the band axis (first axis checked first);
  otherwise the smaller of the first and last axes is (ties: first). ``layout="chw"`` or
  ``"hwc"`` forces one.
* Every user-caused failure raises :class:`cka_geo.errors.DataError` with one line naming the
  file or folder: wrong band count (found vs expected), mask/image size mismatch (both
  files), empty folder, unreadable file, unknown suffix.

Only numpy and torch are imported at module level. This module gathers the loaders, which
live in :mod:`~cka_geo.data.readers`, :mod:`~cka_geo.data.imagefolder`,
:mod:`~cka_geo.data.sen1floods11` and :mod:`~cka_geo.data.pastis`.
"""


from __future__ import annotations

from cka_geo.data.imagefolder import ImageFolder, iter_batches, load_array_probes
from cka_geo.data.pastis import PastisLike, evenly_spaced_frames
from cka_geo.data.readers import (
    IMAGE_SUFFIXES,
    read_image,
    read_mask,
)
from cka_geo.data.sen1floods11 import Sen1Floods11

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "PastisLike",
    "Sen1Floods11",
    "evenly_spaced_frames",
    "iter_batches",
    "load_array_probes",
    "read_image",
    "read_mask",
]
