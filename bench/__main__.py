"""``python -m bench``: run the micro-benchmarks, save them under bench/results/<device>/, write the report."""
import sys

from .run import main

sys.exit(main())
