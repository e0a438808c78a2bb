"""What the bad-input tests check of a CLI run: one `Error:` line, and which versions exist afterwards."""

import json


def one_error_line(r, *needles) -> str:
    """Exit 1, exactly one `Error:` line holding every needle, no traceback; returns the line."""
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def versions(cli_run) -> list:
    """Every memory version `memory list --json` shows."""
    return [v for m in json.loads(cli_run("memory", "list", "--json").output) for v in m["versions"]]


def build(cli_run, name, source, backbone, *extra, ok=True):
    return cli_run("memory", "build", name, source, "--backbone", backbone, *extra, ok=ok)
