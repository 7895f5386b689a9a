"""harness.matrix.markdown: the grid with status marks, and a line per problem."""

from __future__ import annotations

from pathlib import Path

from harness.matrix.markdown import publish_markdown, render_markdown
from tests.test_report import PASS_CELL, all_cells_passing, rec, result


def test_the_grid_marks_each_cell_and_lists_each_problem_on_one_line() -> None:
    records = all_cells_passing()
    records[1] = rec(
        "failed",
        cell=("no_loop", "solo", "redis"),
        runs=(1500,),
        nodeid="t.py::f",
        message="status is 'failed' | expected 'success'\nthe log lines",
    )
    records[2] = rec("skipped", cell=PASS_CELL, message="uvloop is not installed")
    text = render_markdown(result(*records, pytest_exit_code=1))
    lines = text.splitlines()

    assert lines[0] == "## ingest-harness matrix: FAIL"
    assert lines[2] == "5 cells: 3 pass, 1 fail, 1 skipped"
    assert lines[4] == "| loop mode | prefork/redis | solo/redis |"
    assert lines[5] == "| --- | --- | --- |"
    assert lines[6] == "| no_loop | ✅ pass 1 · 85ms | ❌ FAIL 1/1 · 1.50s |"
    assert lines[7] == "| running_loop | ⏭️ skipped 1 | ✅ pass 1 · 85ms |"
    assert lines[8] == "| in_process | ✅ pass 1 · 85ms | · |"
    # One line each, a table's | escaped, the message's first line only.
    assert "- ❌ `no_loop/solo/redis` `t.py::f`: status is 'failed' \\| expected 'success'" in lines
    assert "- ⏭️ `running_loop/prefork/redis`: uvloop is not installed" in lines
    assert "the log lines" not in text


def test_published_beside_the_report_and_appended_to_the_step_summary(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("before\n", encoding="utf-8")
    done = result(*all_cells_passing(), pytest_exit_code=0)

    assert publish_markdown(done, tmp_path / "r" / "m.md", env={}) is None
    assert (
        publish_markdown(done, tmp_path / "r" / "m.md", env={"GITHUB_STEP_SUMMARY": str(summary)})
        == summary
    )
    text = (tmp_path / "r" / "m.md").read_text(encoding="utf-8")
    assert text.startswith("## ingest-harness matrix: PASS\n")
    assert summary.read_text(encoding="utf-8") == "before\n" + text + "\n"
