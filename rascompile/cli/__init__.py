"""The ``rascompile`` command: ``main`` dispatches to one module per subcommand (bench, check, demo, export)."""

from .main import main

__all__ = ["main"]
