"""Usage errors of the harness's command lines: one line, exit code 2, never the usage block."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error is one line and exit code 2: what was wrong
    (argparse names the option) and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")
