"""Parse the worker's log file and pick out the runbook's lines for one run.

The line format and the message templates here are the runbook's (``[%Y-%m-%d %H:%M:%S] LEVEL
logger.name: message``); the harness's own lines (loop mode, idle loop check) are defined here
too, so that whatever writes a line and whatever looks for it share one definition.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CLOSED_CHECK_FAILED_TEMPLATE",
    "CLOSED_CHECK_OK_TEMPLATE",
    "CLOSED_CHECK_RE",
    "COMPLETED_RE",
    "COMPLETED_TEMPLATE",
    "FAILED_RE",
    "FAILED_TEMPLATE",
    "FORBIDDEN_TEXT",
    "HARNESS_LOGGER",
    "IDLE_CHECK_FAILED_TEMPLATE",
    "IDLE_CHECK_OK_TEMPLATE",
    "IDLE_CHECK_RE",
    "INHERITED_CHECK_FAILED_TEMPLATE",
    "INHERITED_CHECK_OK_TEMPLATE",
    "INHERITED_CHECK_RE",
    "JOB_FAULT_RE",
    "JOB_FAULT_TEMPLATE",
    "LINE_RE",
    "LOG_DATEFMT",
    "LOOP_MODE_RE",
    "LOOP_MODE_TEMPLATE",
    "PROBE_RE",
    "RUNNER_LOGGER",
    "RUNNER_RE",
    "RUNNER_TEMPLATE",
    "SHARED_LOOP_RE",
    "SHARED_LOOP_TEMPLATE",
    "STALLING_LINE",
    "STARTING_RE",
    "STARTING_TEMPLATE",
    "STRATEGY_ASYNCIO_RUN",
    "STRATEGY_THREAD_POOL",
    "TASK_LOGGER",
    "TRACE_LOGGER",
    "LogLine",
    "RunnerLine",
    "find_forbidden",
    "harness_lines",
    "parse_log",
    "parse_runner_line",
    "probe_lines",
    "promised_end",
    "read_log_file",
    "runner_lines",
    "task_lines",
    "trace_lines",
    "tracebacks",
]

LOG_DATEFMT: Final = "%Y-%m-%d %H:%M:%S"
# One record's first line. The level is a word (Celery also writes WARNING/CRITICAL); the
# logger name has no spaces and ends at the first ": ".
LINE_RE: Final = re.compile(
    r"^\[(?P<ts>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:,\d+)?\] "
    r"(?P<level>[A-Z]+) (?P<logger>[^\s:]+(?::[^\s:]+)*): (?P<message>.*)$"
)

RUNNER_LOGGER: Final = "app.utils.asyncio_runner"
TASK_LOGGER: Final = "app.tasks.ingest.execute_ingest"
HARNESS_LOGGER: Final = "harness.loopmodes"
# Celery's own "Task <name>[<id>] succeeded in ..." / "... raised unexpected: ..." lines: the
# last line a task writes, after everything the task body logged.
TRACE_LOGGER: Final = "celery.app.trace"

STRATEGY_ASYNCIO_RUN: Final = "asyncio.run()"
STRATEGY_THREAD_POOL: Final = "thread pool"
# The runbook's runner line; ``context`` is the repr of the dict the task passes.
RUNNER_TEMPLATE: Final = (
    "run_async_safe: detected_running_loop={detected}, using {strategy} (context: {context})"
)
RUNNER_RE: Final = re.compile(
    r"^run_async_safe: detected_running_loop=(?P<detected>True|False), "
    r"using (?P<strategy>asyncio\.run\(\)|thread pool) \(context: (?P<context>.*)\)$"
)

STARTING_TEMPLATE: Final = "Starting run {run_id}"
COMPLETED_TEMPLATE: Final = "Run {run_id} completed successfully"
FAILED_TEMPLATE: Final = "Run {run_id} failed: {error}"
STARTING_RE: Final = re.compile(r"^Starting run (?P<run_id>\d+)$")
COMPLETED_RE: Final = re.compile(r"^Run (?P<run_id>\d+) completed successfully$")
FAILED_RE: Final = re.compile(r"^Run (?P<run_id>\d+) failed: (?P<error>.*)$")

# The bug the fix removed; it must never appear in a log of the fixed service.
FORBIDDEN_TEXT: Final = "asyncio.run() cannot be called from a running event loop"

# The harness's own lines, written inside the worker by the loop-mode shim.
LOOP_MODE_TEMPLATE: Final = "loop mode for run {run_id}: {mode} (from {source})"
LOOP_MODE_RE: Final = re.compile(
    r"^loop mode for run (?P<run_id>\d+): (?P<mode>\w+) \(from (?P<source>[^)]*)\)$"
)
IDLE_CHECK_OK_TEMPLATE: Final = "idle loop check for run {run_id}: still set and open"
IDLE_CHECK_FAILED_TEMPLATE: Final = (
    "idle loop check for run {run_id}: replaced or closed ({detail})"
)
# After each run, what it left behind in its worker process (harness.workers.probe).
PROBE_RE: Final = re.compile(
    r"^after run (?P<run_id>\S+): open_loops=(?P<open_loops>\d+) "
    r"pending_tasks=(?P<pending_tasks>\d+) new_threads=(?P<new_threads>\S+) "
    r"db_connections=(?P<db_connections>[+-]\d+)$"
)
# A message with the harness_job_fault header: the job raises that fault from inside, mid-run.
JOB_FAULT_TEMPLATE: Final = "job fault for run {run_id}: {fault} (raised inside the job)"
JOB_FAULT_RE: Final = re.compile(
    r"^job fault for run (?P<run_id>\S+): (?P<fault>\w+) \(raised inside the job\)$"
)
# Under gevent, greenlets share their OS thread's running loop (asyncio keeps it per OS thread):
# with several runs in flight, a run can start while another run's loop is running and visible.
# The shim cannot clear it, so it says so, and the run is then in the running-loop condition.
SHARED_LOOP_TEMPLATE: Final = (
    "shared running loop for run {run_id}: another greenlet's loop runs on this OS thread"
)
SHARED_LOOP_RE: Final = re.compile(
    r"^shared running loop for run (?P<run_id>\S+): another greenlet's loop runs on this OS thread$"
)
IDLE_CHECK_RE: Final = re.compile(
    r"^idle loop check for run (?P<run_id>\S+): "
    r"(?:(?P<ok>still set and open)|replaced or closed \((?P<detail>.*)\))$"
)

INHERITED_CHECK_OK_TEMPLATE: Final = "inherited loop check for run {run_id}: still set and open"
INHERITED_CHECK_FAILED_TEMPLATE: Final = (
    "inherited loop check for run {run_id}: replaced or closed ({detail})"
)
INHERITED_CHECK_RE: Final = re.compile(
    r"^inherited loop check for run (?P<run_id>\S+): "
    r"(?:(?P<ok>still set and open)|replaced or closed \((?P<detail>.*)\))$"
)
CLOSED_CHECK_OK_TEMPLATE: Final = "closed loop check for run {run_id}: still set, and closed"
CLOSED_CHECK_FAILED_TEMPLATE: Final = "closed loop check for run {run_id}: changed ({detail})"
CLOSED_CHECK_RE: Final = re.compile(
    r"^closed loop check for run (?P<run_id>\S+): "
    r"(?:(?P<ok>still set, and closed)|changed \((?P<detail>.*)\))$"
)

# The warning of a fault worker started with stall_before_task=True, as each task stalls.
STALLING_LINE: Final = "fault: stalling before the task body of message {task_id}"

_TRACEBACK_HEAD: Final = "Traceback (most recent call last):"
_CHAIN_LINES: Final = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log record: its first line parsed, continuation lines (tracebacks) attached.

    ``message`` holds the first line's message plus the continuation lines, newline-joined,
    as the logging module wrote them; ``headline`` is just the first line's message. Lines
    before the first record (a crash before logging was set up) become records with
    ``ts=None`` and empty level and logger.
    """

    ts: datetime | None
    level: str
    logger: str
    message: str
    raw: str

    @property
    def headline(self) -> str:
        return self.message.split("\n", 1)[0]


@dataclass(frozen=True, slots=True)
class RunnerLine:
    """A parsed ``run_async_safe`` line."""

    detected_running_loop: bool
    strategy: str
    context: dict[str, Any] | None
    line: LogLine


def parse_log(text: str) -> list[LogLine]:
    """Split a log file's text into records."""
    records: list[LogLine] = []
    head: re.Match[str] | None = None
    raw: list[str] = []
    extra: list[str] = []

    def flush() -> None:
        if not raw:
            return
        if head is None:
            records.append(
                LogLine(ts=None, level="", logger="", message="\n".join(raw), raw="\n".join(raw))
            )
            return
        message = "\n".join([head["message"], *extra])
        records.append(
            LogLine(
                ts=datetime.strptime(head["ts"], LOG_DATEFMT),
                level=head["level"],
                logger=head["logger"],
                message=message,
                raw="\n".join(raw),
            )
        )

    for line in text.splitlines():
        match = LINE_RE.match(line)
        if match is not None:
            flush()
            head, raw, extra = match, [line], []
        elif head is None and raw:
            # Unformatted output before the first record (a crash at import time): one
            # record per line, so a short tail still shows the last of it.
            flush()
            raw = [line]
        else:
            raw.append(line)
            extra.append(line)
    flush()
    return records


def read_log_file(path: Path, *, offset: int = 0) -> list[LogLine]:
    """Parse a log file from byte ``offset``; a missing file is an empty log."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return []
    return parse_log(data.decode("utf-8", errors="replace"))


def _context(text: str) -> dict[str, Any] | None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_runner_line(line: LogLine) -> RunnerLine | None:
    """The runner line's parts, or ``None`` if ``line`` is not one."""
    if line.logger != RUNNER_LOGGER:
        return None
    match = RUNNER_RE.match(line.headline)
    if match is None:
        return None
    return RunnerLine(
        detected_running_loop=match["detected"] == "True",
        strategy=match["strategy"],
        context=_context(match["context"]),
        line=line,
    )


def runner_lines(lines: Iterable[LogLine], run_id: int) -> list[RunnerLine]:
    """The runner lines whose context has ``'run_id': run_id`` (the int itself, not a prefix)."""
    selected = []
    for line in lines:
        parsed = parse_runner_line(line)
        if parsed is None or parsed.context is None:
            continue
        value = parsed.context.get("run_id")
        # bool is an int; a context of {'run_id': True} is not run 1.
        if isinstance(value, int) and not isinstance(value, bool) and value == run_id:
            selected.append(parsed)
    return selected


def task_lines(lines: Iterable[LogLine], run_id: int) -> list[LogLine]:
    """The task's own lines for one run (starting, completed, failed), in log order."""
    selected = []
    for line in lines:
        if line.logger != TASK_LOGGER:
            continue
        for pattern in (STARTING_RE, COMPLETED_RE, FAILED_RE):
            match = pattern.match(line.headline)
            if match is not None and int(match["run_id"]) == run_id:
                selected.append(line)
                break
    return selected


def probe_lines(lines: Iterable[LogLine], run_id: int) -> list[LogLine]:
    """The shim's probe line(s) for one run: what it left behind in its worker process."""
    return [
        line
        for line in lines
        if line.logger == HARNESS_LOGGER
        and (match := PROBE_RE.match(line.headline)) is not None
        and match["run_id"] == str(run_id)
    ]


def promised_end(lines: Iterable[LogLine], run_id: int) -> str | None:
    """The status the task's own end line for the run promises is committed: ``success`` for
    ``Run N completed successfully``, ``failed`` for ``Run N failed: ...``; None before it."""
    for line in task_lines(lines, run_id):
        if COMPLETED_RE.match(line.headline):
            return "success"
        if FAILED_RE.match(line.headline):
            return "failed"
    return None


def trace_lines(lines: Iterable[LogLine], task_id: str) -> list[LogLine]:
    """Celery's lines on how the task with ``task_id`` ended (succeeded, raised, retried)."""
    tag = f"[{task_id}]"
    return [line for line in lines if line.logger == TRACE_LOGGER and tag in line.headline]


def harness_lines(lines: Iterable[LogLine], run_id: int) -> list[LogLine]:
    """The shim's lines (loop mode, job fault, shared running loop, idle or closed loop check)
    for one run."""
    selected = []
    for line in lines:
        if line.logger != HARNESS_LOGGER:
            continue
        for pattern in (
            LOOP_MODE_RE,
            JOB_FAULT_RE,
            SHARED_LOOP_RE,
            IDLE_CHECK_RE,
            CLOSED_CHECK_RE,
            INHERITED_CHECK_RE,
        ):
            match = pattern.match(line.headline)
            if match is not None and match["run_id"] == str(run_id):
                selected.append(line)
                break
    return selected


def find_forbidden(lines: Iterable[LogLine]) -> list[LogLine]:
    """Records that mention the pre-fix bug, in their message or their traceback."""
    return [line for line in lines if FORBIDDEN_TEXT in line.raw]


def tracebacks(lines: Iterable[LogLine]) -> list[str]:
    """Each Python traceback in the log, chained exceptions kept in one block.

    All lines are scanned in order, not record by record: a traceback printed before logging
    was set up spans several header-less records.
    """
    texts = [text for line in lines for text in line.raw.splitlines()]
    blocks: list[str] = []
    i = 0
    while i < len(texts):
        if texts[i].strip() != _TRACEBACK_HEAD:
            i += 1
            continue
        start = i
        while True:
            i += 1
            # Frames, source lines and caret markers are indented; the first unindented line
            # is the exception itself.
            while i < len(texts) and texts[i][:1].isspace() and texts[i].strip():
                i += 1
            i = min(i + 1, len(texts))
            end = i
            nxt = _skip_blank(texts, i)
            if nxt < len(texts) and texts[nxt].strip() in _CHAIN_LINES:
                head = _skip_blank(texts, nxt + 1)
                if head < len(texts) and texts[head].strip() == _TRACEBACK_HEAD:
                    i = head
                    continue
            break
        blocks.append("\n".join(texts[start:end]))
        i = end
    return blocks


def _skip_blank(texts: Sequence[str], i: int) -> int:
    while i < len(texts) and not texts[i].strip():
        i += 1
    return i
