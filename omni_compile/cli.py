"""``omni-compile`` command line: one word per job, each taking ``--help``.

    omni-compile demo      # the learned zoo model, dense and through backend="flashomni" (omni_compile.zoo.demo)
    omni-compile bench     # the ops against cuDNN / FlexAttention / cuBLAS on a GPU (omni_compile.bench.kernels)
    omni-compile e2e       # full-size denoising loops against Inductor on a GPU (omni_compile.bench.e2e)
    omni-compile quality   # quality of each setting on the learned model (omni_compile.bench.quality)
    omni-compile tune      # the fastest setting within a quality budget (omni_compile.tune; omni_compile.bench.tuning)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "omni_compile.zoo.demo",
    "bench": "omni_compile.bench.kernels",
    "e2e": "omni_compile.bench.e2e",
    "quality": "omni_compile.bench.quality",
    "tune": "omni_compile.bench.tuning",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: omni-compile {{{','.join(COMMANDS)}}} [options]   (each takes --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
