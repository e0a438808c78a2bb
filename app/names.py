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
