"""``omni-compile`` command line: ``omni-compile demo [...]``, ``omni-compile bench [...]``."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "omni_compile.demo", "bench": "omni_compile.bench"}
    if not argv or argv[0] not in commands:
        print("usage: omni-compile {demo,bench} [options]   (each takes --help)", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
