"""``python -m rascompile COMMAND``: the ``rascompile`` command (``torchrun -m rascompile bench ...`` for
``rascompile bench --context-parallel P``)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
