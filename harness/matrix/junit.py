"""The matrix as JUnit XML: ``reports/matrix-junit.xml``, what CI systems' test tabs read.

One ``<testsuite>`` per matrix run (``harness flake`` writes one per run), one ``<testcase>`` per
scenario per cell. Each test case carries its cell (loop mode, pool, broker), the backend, the
Celery worker and its run durations as ``<property>`` elements, and a failure its whole text as
the terminal shows it: the traceback with the row diff, then the run's worker log lines.

Written from :class:`~harness.matrix.report.MatrixResult`, which the process that runs pytest
builds from the reports it receives (the xdist controller gets every worker's), so the file is
whole under pytest-xdist: no property is lost the way ``record_testsuite_property``'s are,
which each xdist worker keeps to itself.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from harness.core.cell import NO_WORKER
from harness.matrix.report import VERSION_KEYS, MatrixResult, TestRecord, write_atomic

__all__ = ["render_junit", "write_junit"]

# XML 1.0 allows tab, newline, carriage return and these ranges; a worker log's ANSI colour
# codes (ESC) are not among them, and a parser rejects the whole file for one.
_INVALID_XML: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_MESSAGE_CHARS: Final = 500


def _xml(text: object) -> str:
    return _INVALID_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _split_nodeid(nodeid: str) -> tuple[str, str]:
    """``scenarios/test_matrix.py::test_success[x]`` -> ``scenarios.test_matrix`` and
    ``test_success[x]``, as pytest's own JUnit report names them (a class joins the first)."""
    path, _, rest = nodeid.partition("::")
    module = path.removesuffix(".py").replace("/", ".").replace("\\", ".")
    parts = rest.split("::") if rest else [nodeid]
    return ".".join([module, *parts[:-1]]), parts[-1]


def _properties(parent: ET.Element, values: Sequence[tuple[str, object]]) -> None:
    kept = [(name, value) for name, value in values if value not in (None, "")]
    if not kept:
        return
    element = ET.SubElement(parent, "properties")
    for name, value in kept:
        ET.SubElement(element, "property", name=_xml(name), value=_xml(value))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:_MESSAGE_CHARS]


def _testcase(suite: ET.Element, record: TestRecord, backend: str) -> None:
    classname, name = _split_nodeid(record.nodeid)
    case = ET.SubElement(
        suite,
        "testcase",
        classname=_xml(classname),
        name=_xml(name),
        time=f"{record.duration_s:.3f}",
    )
    mode, pool, broker = record.cell or (None, None, None)
    runs = ",".join(str(ms) for ms in record.run_durations_ms)
    _properties(
        case,
        [
            ("loop_mode", mode),
            ("pool", None if pool == NO_WORKER else pool),
            ("broker", None if broker == NO_WORKER else broker),
            ("backend", backend),
            ("run_duration_ms", runs),
            ("celery_worker", record.celery_worker),
            *record.properties,
        ],
    )
    message = record.message or record.outcome
    if record.outcome == "failed":
        # pytest's convention: a failed setup or teardown is an error, a failed call a failure.
        tag = "error" if message.startswith("error in ") else "failure"
        element = ET.SubElement(case, tag, message=_xml(_first_line(message)))
        element.text = _xml(record.details or message)
    elif record.outcome == "interrupted":
        element = ET.SubElement(case, "error", message=_xml(_first_line(message)))
        element.text = _xml(message)
    elif record.outcome == "skipped":
        ET.SubElement(case, "skipped", message=_xml(_first_line(message)))


def _suite(root: ET.Element, result: MatrixResult, name: str) -> None:
    records = result.records
    failures = sum(
        r.outcome == "failed" and not (r.message or "").startswith("error in ") for r in records
    )
    errors = sum(r.outcome == "interrupted" for r in records) + sum(
        r.outcome == "failed" and (r.message or "").startswith("error in ") for r in records
    )
    backend = str((result.served_by or {}).get("backend") or result.services)
    wall = result.wall_s if result.wall_s is not None else sum(r.duration_s for r in records)
    suite = ET.SubElement(
        root,
        "testsuite",
        name=_xml(name),
        tests=str(len(records) + len(result.errors)),
        failures=str(failures),
        errors=str(errors + len(result.errors)),
        skipped=str(sum(r.outcome == "skipped" for r in records)),
        time=f"{wall:.3f}",
        timestamp=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        hostname=_xml(result.machine.get("hostname") or os.uname().nodename),
    )
    _properties(
        suite,
        [
            *((key, result.versions.get(key)) for key in VERSION_KEYS),
            ("backend", backend),
            ("shard", None if result.shard is None else str(result.shard)),
        ],
    )
    for record in records:
        _testcase(suite, record, backend)
    # A problem outside any test (a collection error, pytest refusing its arguments) is a test
    # case of its own: a JUnit reader that counts only test cases must still see it fail.
    for index, error in enumerate(result.errors, 1):
        case = ET.SubElement(suite, "testcase", classname="harness", name=f"matrix-error-{index}")
        element = ET.SubElement(case, "error", message=_xml(_first_line(error)))
        element.text = _xml(error)


def render_junit(suites: Sequence[tuple[str, MatrixResult]]) -> bytes:
    """``<testsuites>`` with one ``<testsuite>`` per (name, result)."""
    root = ET.Element("testsuites", name="ingest-harness")
    for name, result in suites:
        _suite(root, result, name)
    root.set("tests", str(sum(int(s.get("tests", "0")) for s in root)))
    root.set("failures", str(sum(int(s.get("failures", "0")) for s in root)))
    root.set("errors", str(sum(int(s.get("errors", "0")) for s in root)))
    root.set("skipped", str(sum(int(s.get("skipped", "0")) for s in root)))
    ET.indent(root)
    text: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return text + b"\n"


def write_junit(path: Path, suites: Sequence[tuple[str, MatrixResult]]) -> None:
    write_atomic(path, render_junit(suites))
