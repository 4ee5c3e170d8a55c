"""The benchmark harness behind ``python -m crelu_ext bench`` (extra ``[bench]``):
every backend against a device copy, eager and compiled composition, in one run."""

from .harness import main

__all__ = ["main"]
