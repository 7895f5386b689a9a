"""Launching Debian's chromium with Playwright (no browser download works on these machines).

Playwright's own ``playwright install`` fetches browser builds from the internet, which is not
reachable here; the distribution's ``chromium`` package is, and Playwright drives it as long as
it is given the executable and run without the sandbox (we run as root).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Final

from harness.core.errors import SetupError

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

__all__ = ["CHROMIUM_ARGS", "CHROMIUM_PATH", "ChromiumNotFoundError", "launch_chromium"]

CHROMIUM_PATH: Final = Path("/usr/bin/chromium")

# Root needs --no-sandbox; the rest keep the browser from calling home (updates, sync, QUIC
# probes) so a test never touches the internet and never waits for it.
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


class ChromiumNotFoundError(SetupError):
    """The chromium executable is not installed where we looked."""


def launch_chromium(
    playwright: Playwright, *, executable: Path = CHROMIUM_PATH, headless: bool = True
) -> Browser:
    """A headless chromium driven by ``playwright``; raises ``ChromiumNotFoundError`` if absent."""
    if not executable.is_file():
        on_path = shutil.which("chromium")
        found = (
            f"; `chromium` on PATH is {on_path}" if on_path else "; no `chromium` on PATH either"
        )
        raise ChromiumNotFoundError(
            f"chromium is not installed: {executable} does not exist{found}. "
            "Install Debian's package with `apt-get update && apt-get install -y chromium` "
            "(`make test` does that). `playwright install` cannot work here: it downloads "
            "browsers from the internet."
        )
    return playwright.chromium.launch(
        executable_path=str(executable), args=list(CHROMIUM_ARGS), headless=headless
    )
