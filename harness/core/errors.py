"""The root of every error the harness raises, and the tree under it.

Each error says what failed, what was checked and how to fix it, with secrets masked; the
ones from a server or a worker carry the tail of its log. The three branches keep the standard
base a caller already catches (``ValueError`` for bad input, ``RuntimeError`` for what could not
start, ``AssertionError`` for a check that failed, so pytest reports it as a failed assertion)::

    HarnessError
     ├── UsageError (ValueError)              the input is wrong; nothing was started
     │    ├── ConfigError                     an option, ini value or HARNESS_* variable
     │    ├── LoopModeError                   an unknown loop mode, or one that cannot be forced
     │    ├── ShardError                      a --shard that names no shard of the selection
     │    ├── MergeError                      shard reports that are not one matrix's shards
     │    └── TargetError                     no Target, or one that cannot be loaded
     ├── SetupError (RuntimeError)            something the harness needs could not be had
     │    ├── ServicesError                   Postgres or Redis
     │    │    ├── ServicesUnavailable        no backend can run here: one reason per backend
     │    │    ├── ServiceStartError          started (or reached) but never ready; its log
     │    │    └── ComposeError               docker compose failed; its output
     │    ├── BrokerUnavailable               a broker of the matrix is not here (a skip)
     │    ├── BrokerUnreachable               the broker URL given does not answer
     │    ├── WorkerStartError                a Celery worker never answered a ping; its log
     │    ├── ForkServerError                 the workers' fork server is gone (they are exec'ed)
     │    ├── ServerStartError                a uvicorn or marketplace server never answered
     │    ├── PortInUseError                  a fixed port of the stack is taken
     │    ├── PythonNotFound                  no CPython of a --python version here (a skip)
     │    └── ChromiumNotFoundError           no headless Chromium for the UI checks
     └── CheckFailed (AssertionError)         what the service did is not what it promises
          ├── RunAssertionError               a run's row or log lines
          ├── RunNotTerminalError             a run that did not end in time
          ├── FaultInvariantError             an invariant after a fault scenario
          └── DeadlineExceeded                a test still running at its deadline; stacks

``harness.matrix.cli`` turns a UsageError into one line and exit code 2; everything else is a failed
cell or test with its evidence attached.
"""

from __future__ import annotations

__all__ = ["CheckFailed", "HarnessError", "SetupError", "UsageError"]


class HarnessError(Exception):
    """Every error the harness raises derives from this one."""


class UsageError(HarnessError, ValueError):
    """The input is wrong (an option, a variable, an argument); nothing was started."""


class SetupError(HarnessError, RuntimeError):
    """A server, a worker or a tool the harness needs could not be had."""


class CheckFailed(HarnessError, AssertionError):
    """The service did not do what it promises: the message holds the evidence."""
