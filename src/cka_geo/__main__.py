"""``python -m cka_geo`` is the ``cka-geo`` console script."""

import sys

from cka_geo.cli import main

sys.exit(main())
