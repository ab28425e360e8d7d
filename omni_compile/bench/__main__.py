"""``python -m omni_compile.bench``: the kernel benchmark (:mod:`omni_compile.bench.kernels`)."""

import sys

from .kernels import main

sys.exit(main())
