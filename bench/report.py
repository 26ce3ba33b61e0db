"""The one way benchmarks publish: print the table and append it to their results file."""

from __future__ import annotations

from pathlib import Path


def append_report(path: Path, lines: list[str]) -> None:
    """`lines` (a heading, the command, a markdown table, notes) printed and appended to `path`."""
    table = "\n".join(lines) + "\n\n"
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(table)
