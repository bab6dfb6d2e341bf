"""The same as :mod:`cka_geo.models.openclip` (this import path keeps working)."""

import sys

from cka_geo.models import openclip as _module

sys.modules[__name__] = _module
