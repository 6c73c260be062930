"""``python -m qipo_kernels ...`` is ``qipo-kernels ...`` (see qipo_kernels.cli)."""
import sys

from .cli import main

sys.exit(main())
