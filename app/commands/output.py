"""What every command prints with: JSON for --json, and one-line-per-row tables."""

from __future__ import annotations

import json

import click


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def table(rows: list[list], headers: list[str]) -> None:
    # one line per row: a caption's line breaks and tabs would break the columns (--json keeps them)
    rows = [[("" if c is None else " ".join(str(c).split())) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
