"""The ``medcam3d`` command line: ``explain``, ``view``, ``demo`` (entry point :func:`main`)."""

from medcam3d.cli.main import main

__all__ = ["main"]
