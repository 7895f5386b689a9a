"""How asyncio treats a thread's loop on this interpreter: run it on each one and compare.

The loop modes force these conditions in a worker; what the standard library does in each of
them changed across CPython versions (3.12 deprecated the loop that ``get_event_loop()`` makes
implicitly). Run as ``python3.X bench/asyncio_versions.py``; it prints one line of findings.
docs/harness.md records the lines for 3.11, 3.12 and 3.13 on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import warnings
from collections.abc import Callable


def _noted(action: Callable[[], str]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            text = action()
        except RuntimeError:
            text = "RuntimeError"
    return text + "".join(f" + {w.category.__name__}" for w in caught[:1])


def implicit_loop() -> str:
    """get_event_loop() in the main thread of a fresh policy, nothing set yet."""
    asyncio.set_event_loop_policy(None)

    def get() -> str:
        asyncio.get_event_loop().close()
        return "creates a loop"

    return _noted(get)


def after_set_none() -> str:
    """get_event_loop() in the main thread once set_event_loop(None) was called (no_loop)."""
    asyncio.set_event_loop(None)

    def get() -> str:
        asyncio.get_event_loop().close()
        return "creates a loop"

    return _noted(get)


def other_thread() -> str:
    """get_event_loop() in a thread that is not the main one (a threads pool worker)."""
    found: list[str] = []

    def run() -> None:
        found.append(_noted(lambda: str(type(asyncio.get_event_loop()).__name__)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return found[0]


def after_asyncio_run() -> str:
    """The thread's loop after asyncio.run() when a loop was set (idle_loop under the old code)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncio.run(asyncio.sleep(0))
    try:
        current = asyncio.get_event_loop()
        text = "the same loop" if current is loop else "another loop"
    except RuntimeError:
        text = "none set"
    loop.close()
    asyncio.set_event_loop(None)
    return text


def closed_loop_set() -> str:
    """get_event_loop() when a closed loop is set (closed_loop)."""
    loop = asyncio.new_event_loop()
    loop.close()
    asyncio.set_event_loop(loop)
    text = _noted(lambda: "the closed loop" if asyncio.get_event_loop() is loop else "another")
    asyncio.set_event_loop(None)
    return text


def main() -> None:
    checks = (implicit_loop, after_set_none, other_thread, after_asyncio_run, closed_loop_set)
    findings = ", ".join(f"{check.__name__}: {check()}" for check in checks)
    print(f"Python {sys.version.split()[0]}: {findings}")


if __name__ == "__main__":
    main()
