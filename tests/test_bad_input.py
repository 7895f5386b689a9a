"""Every row of docs/bad-input.md, tried: the command lines as a user types them, the API's
inputs over real HTTP. The table is the test's data, so the docs cannot drift from what the
tools say."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import pytest

from fixtures.api import ApiTokens

ROOT: Final = Path(__file__).resolve().parent.parent
DOC: Final = ROOT / "docs" / "bad-input.md"
_ROW: Final = re.compile(
    r"^\| (?P<id>[ca]\d+) \| (?P<input>.+) \| (?P<code>\d+) \| `(?P<says>.+)` \|$"
)


@dataclass(frozen=True)
class Row:
    id: str
    input: str
    code: int
    says: str


def _rows(prefix: str) -> list[Row]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match and match["id"].startswith(prefix):
            rows.append(Row(match["id"], match["input"], int(match["code"]), match["says"]))
    return rows


def test_the_table_has_its_rows() -> None:
    assert len(_rows("c")) >= 20 and len(_rows("a")) >= 10


@pytest.mark.parametrize("row", _rows("c"), ids=lambda r: r.id)
def test_command_line(row: Row, tmp_path: Path) -> None:
    command = row.input.strip("`")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARNESS_", "APP_", "PYTEST_"))}
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == row.code, f"{command}: exit {done.returncode}\n{output}"
    assert row.says in output, f"{command}:\n{output}"
    assert "Traceback" not in output, output
    assert "secret" not in output, "a password was printed"
    assert not (ROOT / "bad-input.db").exists(), "a SQLite file was created"


_API: Final = re.compile(r"`(?P<method>GET|POST) (?P<path>\S+)(?: (?P<body>.+?))?`(?P<rest>.*)")


@pytest.mark.parametrize("row", _rows("a"), ids=lambda r: r.id)
def test_api(row: Row, api_client: httpx.Client, api_tokens: ApiTokens) -> None:
    match = _API.fullmatch(row.input)
    assert match is not None, row.input
    headers = dict(api_client.headers)
    if "no token" in match["rest"]:
        headers.pop("authorization", None)
    elif "wrong token" in match["rest"]:
        headers["authorization"] = "Bearer not-a-token"
    body = match["body"]
    content: bytes | None = None
    if body == "BIG":
        content = json.dumps({"job_code": "stocks", "pad": "x" * 1_000_000}).encode()
    elif body is not None:
        content = body.encode()
    if content is not None:
        headers["content-type"] = "application/json"
    with httpx.Client(base_url=str(api_client.base_url), timeout=10.0) as client:
        response = client.request(match["method"], match["path"], content=content, headers=headers)
    assert response.status_code == row.code, response.text[:500]
    assert row.says in response.text, response.text[:500]
    assert len(response.content) < 2000, "an error answer must be short"
