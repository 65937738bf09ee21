"""Rows of ours-versus-paper figures, rendered as Markdown and as one JSON object."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
    row: str
    quantity: str
    ours: float
    paper: float | None = None
    note: str = ""
    fmt: str = ",.2f"


@dataclasses.dataclass(frozen=True)
class Table:
    key: str  # JSON key
    title: str
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()


def _difference(r: Row) -> str:
    if r.paper is None:
        return ""
    d = r.ours - r.paper
    if abs(d) <= 1e-9 * max(1.0, abs(r.paper)):
        return "0"
    if float(f"{abs(d):{r.fmt}}".replace(",", "")) == 0:
        return "0 (at this rounding)"
    rel = f" ({100 * d / r.paper:+.2f} %)" if r.paper else ""
    return f"{d:+{r.fmt}}{rel}"


def to_markdown(table: Table) -> str:
    """The table as Markdown: row | quantity | ours | paper | difference | note."""
    lines = [
        f"### {table.title}",
        "",
        "| row | quantity | ours | paper | difference | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in table.rows:
        paper = "" if r.paper is None else f"{r.paper:{r.fmt}}"
        lines.append(
            f"| {r.row} | {r.quantity} | {r.ours:{r.fmt}} | {paper} | {_difference(r)} | {r.note} |"
        )
    lines += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines)


def to_json(tables: list[Table]) -> dict:
    """{table key: {row: {quantity: {"ours": x, "paper": y}}}}."""
    out: dict = {}
    for t in tables:
        d = out.setdefault(t.key, {})
        for r in t.rows:
            d.setdefault(r.row, {})[r.quantity] = {
                "ours": round(float(r.ours), 6),
                "paper": r.paper,
            }
    return out
