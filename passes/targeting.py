"""Which nodes a pass may touch: include/exclude regular expressions matched against node names."""
from __future__ import annotations

import re


def compile_patterns(patterns: list[str], flag: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{flag} {p!r} is not a valid regular expression: {err}") from None
    return compiled


def exclusion_reason(name: str, include: list[str], exclude: list[str]) -> str | None:
    """None if the node is selected, else why not (searching the name, Python `re` syntax)."""
    if include and not any(re.search(p, name) for p in include):
        return f"not matched by --include {include}"
    for p in exclude:
        if re.search(p, name):
            return f"excluded by --exclude {p!r}"
    return None
