"""`sftflow version`."""

from __future__ import annotations

from sftflow import __version__


def main(argv: list[str]) -> int:
    print(__version__)
    return 0
