"""Pieces both benchmarks share: the results file that lets a sweep resume, tables and figures."""

from __future__ import annotations

import json
import time
from pathlib import Path


class Results:
    """A JSONL file of finished runs, one object per line, each with a ``key`` naming its run.

    A sweep asks :meth:`done` before each run and :meth:`add` after it, so an interrupted sweep
    started again with the same file skips what finished and redoes only the run it was in.
    A torn last line (the process killed mid-write) is ignored.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.rows[row["key"]] = row

    def done(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        if "key" not in row:
            raise ValueError("a results row needs a 'key'")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        with open(self.path, "a") as f:  # one write per row: processes sharing the file append whole lines
            f.write(("\n" if torn else "") + json.dumps(row) + "\n")
        self.rows[row["key"]] = row


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table; floats with 3 decimals."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 90) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (disabled: a bar that draws nothing but still counts)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=not enabled)


def write_report(rows: list[dict], out: Path, name: str, table, plot, started: float) -> None:
    """The end of a benchmark command: ``table(rows)`` into ``out/<name>.md`` and printed, ``plot(rows, path)`` into
    ``out/<name>.png``, and one line saying how many runs and how long this call took (from ``started``)."""
    report = table(rows)
    (out / f"{name}.md").write_text(report + "\n")
    plot(rows, out / f"{name}.png")
    print(report)
    print(f"\n{len(rows)} runs ({time.perf_counter() - started:.0f} s this call); results in {out / 'results.jsonl'}, "
          f"table in {out / f'{name}.md'}, plot in {out / f'{name}.png'}")
