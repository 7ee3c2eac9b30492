"""The table toolkit every tool shares: a table as data (title, columns, rows of formatted cells, marks), the
number formats, and its two drawings, for the terminal (Rich) and for Markdown.

compare's report tables (compare/tables.py) and the sweep's coverage matrix (zoo/render.py) are built as these,
so the terminal and the Markdown of either draw the same cells. A cell of a verdict column is "PASS", "FAIL" or a
note ("not judged: ..."); a marked cell fails its thresholds (FAILS) or is the first of its backend to (FIRST).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# How numbers are printed. Every printed number equals the JSON's number rounded to this precision.
COSINE = ".7f"  # 7 decimals: the thresholds go down to 0.99999, so two spare digits
ERROR = ".2e"  # max abs, mean abs, relative error: 3 significant digits
MS = ".2f"  # milliseconds per call: 10 µs steps
RATE = ".1f"  # images per second
SPEEDUP = ".2f"  # reference mean / this mean, shown as "1.08x"
VERDICT = "verdict"
FAILS, FIRST = "fails", "first"  # the marks of a cell: it fails its thresholds; it is the first of its backend to
NUMBER = re.compile(r"[-+]?(\d[\d.]*(e[-+]?\d+)?|nan|inf)x?%?|-")  # a cell right-aligned by both renderers


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    caption: str = ""
    marks: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, column) -> FAILS or FIRST

    def numeric(self, column: int) -> bool:
        """Whether every cell of a column is a number or "-", and one at least a number: right-aligned by both renderers."""
        cells = [row[column] for row in self.rows]
        return any(cell != "-" for cell in cells) and all(NUMBER.fullmatch(cell) for cell in cells)


def num(value, spec: str) -> str:
    """A number at its documented precision; "-" for none. format prints NaN and Inf as nan and inf."""
    return "-" if value is None else format(value, spec)


def ratio(value) -> str:
    return "-" if value is None else f"{num(value, SPEEDUP)}x"


def verdict(passed: bool | None, note: str = "") -> str:
    return note if passed is None else "PASS" if passed else "FAIL"


MARKS = {FAILS: "red", FIRST: "bold red reverse"}
STATUS = {"skipped": "yellow", "error": "bold red"}  # a backend that did not run, in the backends table


def rich_table(data: Table):
    """The table drawn for the terminal: numbers right-aligned, verdicts and a backend's status in colour, a failing
    cell red and the first failing one of its backend reversed."""
    from rich.table import Table as RichTable
    from rich.text import Text

    table = RichTable(title=data.title, title_justify="left", caption=data.caption or None, caption_justify="left")
    for index, column in enumerate(data.columns):  # a header too long for its column folds, never ends in "…"
        justify = "right" if data.numeric(index) else "left"
        table.add_column(Text(column, overflow="fold", justify=justify), justify=justify)
    for index, row in enumerate(data.rows):
        cells = []
        for column, cell in enumerate(row):
            name, mark = data.columns[column], data.marks.get((index, column))
            if name == VERDICT and cell in ("PASS", "FAIL"):
                cells.append(Text(cell, style="bold green" if cell == "PASS" else "bold red"))
            elif name == "status" and cell in STATUS:
                cells.append(Text(cell, style=STATUS[cell]))
            else:
                cells.append(Text(cell, style=MARKS[mark]) if mark else cell)
        table.add_row(*cells)
    return table


def markdown_table(data: Table) -> list[str]:
    """The table as Markdown lines: a failing verdict and every marked cell in bold, numbers right-aligned, the
    caption under it."""
    def cell(row: int, column: int, text: str) -> str:
        if data.columns[column] == VERDICT:
            return ("PASS" if text == "PASS" else "**FAIL**") if text in ("PASS", "FAIL") else text
        return f"**{text}**" if (row, column) in data.marks else text

    rows = [[cell(r, c, text) for c, text in enumerate(row)] for r, row in enumerate(data.rows)]
    align = ["---:" if data.numeric(column) else "---" for column in range(len(data.columns))]
    return markdown(data.columns, rows, align) + (["", inline(data.caption)] if data.caption else [])


def markdown(header, rows, align: list[str] | None = None) -> list[str]:
    """A GitHub-flavoured Markdown table; numeric-looking columns are right-aligned unless `align` says."""
    rows = [[inline(str(c)).replace("|", "\\|") for c in row] for row in rows]
    if align is None:
        shown = Table("", tuple(header), [tuple(row) for row in rows])
        align = ["---:" if shown.numeric(column) else "---" for column in range(len(header))]
    return [_row(header), _row(align)] + [_row(row) for row in rows]


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def inline(text: str) -> str:
    """Text on one line: a newline would end a Markdown table row or list item."""
    return " ".join(str(text).split())
