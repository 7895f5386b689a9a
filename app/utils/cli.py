"""What the service's command lines share: usage errors in one line."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error is one line and exit code 2, not the usage block:
    what was wrong (argparse names the option), and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")
