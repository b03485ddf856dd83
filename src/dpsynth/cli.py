"""Compatibility: installs made before the CLI moved to `dpsynth.app.cli` run `dpsynth.cli:main`."""

from dpsynth.app.cli import main

__all__ = ["main"]
