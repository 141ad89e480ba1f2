"""`sftflow version`."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from sftflow import __version__

    print(__version__)
    return 0
