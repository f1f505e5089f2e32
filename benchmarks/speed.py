"""Speed benchmark of RAS vs dense: ``python benchmarks/speed.py [options]`` = ``rascompile bench [options]``.

See ``rascompile bench --help`` and :mod:`rascompile.bench.runner` for what it measures.
"""

import sys

from rascompile.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
