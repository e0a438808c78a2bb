"""Validation of user-chosen names, which end up in collection names and file paths."""

import re

from .errors import RecoError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(name: str, what: str = "memory") -> str:
    if not _NAME.match(name or ""):
        raise RecoError(
            f"invalid {what} name {name!r}: use 1-63 characters from [a-z0-9_-], starting with a letter or digit"
        )
    return name


def parse_memory_ref(ref: str) -> tuple[str, int | None]:
    """`NAME` (the active version) or `NAME@VERSION`. Here, beside the name rule, so that commands can check their
    arguments without importing training (and torch with it)."""
    name, _, version = ref.partition("@")
    check_name(name)
    if version and not version.isdigit():
        raise RecoError(f"bad memory reference {ref!r}: use NAME or NAME@VERSION")
    return name, int(version) if version else None
