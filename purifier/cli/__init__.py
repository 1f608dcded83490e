"""The ``purifier`` command line: thin wrappers over the library.

Torch is imported inside the commands that need it, so ``purifier --help`` and the torch-free commands
work on the base install.
"""

from .common import main
from . import demo, evaluate, exporting, fit, purify, train  # noqa: E402,F401  (each registers its commands on main)


def _add_serve():
    from serve.cli import serve_command

    main.add_command(serve_command)


_add_serve()

__all__ = ["main"]
