"""``python -m nora.demo`` (make demo): see :mod:`nora.demo.runner`."""

import sys

from nora.demo.runner import main

sys.exit(main())
