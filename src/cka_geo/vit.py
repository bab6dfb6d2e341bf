"""The same as :mod:`cka_geo.models.vit` (this import path keeps working)."""

import sys

from cka_geo.models import vit as _module

sys.modules[__name__] = _module
