"""Plain-text tables of the benchmark (fixed-width, so they read the same in a terminal, a log or CI)."""

from __future__ import annotations

from collections.abc import Sequence

from bench import stats


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def num(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def targets_table(result: dict[str, float | None]) -> str:
    rows = []
    for t in stats.targets(result):
        met = "not measured" if t.met is None else ("MET" if t.met else "NOT MET")
        digits = 2 if t.name.endswith(("ratio", "_pts", "_vs_quix")) else (1 if t.name.endswith("_ms") else 0)
        rows.append([t.text, num(t.value, digits), met])
    return table(["target (from the issue)", "measured", "status"], rows, "Targets")


def breakdown_table(title: str, columns: dict[str, dict[str, float]], total: float | None) -> str:
    """Phases as rows, one column per method (µs/event), then the measured service total."""
    phases: list[str] = []
    for col in columns.values():
        phases += [p for p in col if p not in phases and not p.startswith("_")]
    rows = [[p, *[num(col.get(p), 1) if p in col else "" for col in columns.values()]] for p in phases]
    if total is not None:
        rows.append(["service main thread, measured during the drain", *[num(total, 1) for _ in columns]])
    return table(["phase (µs per event)", *columns], rows, title)
