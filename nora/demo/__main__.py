"""``python -m nora.demo`` (make demo): see :mod:`nora.demo.runner`."""

import sys

from nora.demo.runner import main
from nora.logs import setup_logging

setup_logging()
sys.exit(main())
