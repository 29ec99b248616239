"""Which nodes a pass may touch: include/exclude regular expressions matched against node names."""
from __future__ import annotations

import re
from dataclasses import dataclass, field


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


@dataclass
class Targeting:
    """The include/exclude fields every pass config has (a base of each), checked by
    check_targeting() from the config's __post_init__: a bad pattern is one error naming the flag.
    A config with a `min_params` field has it checked too."""
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def check_targeting(self) -> None:
        compile_patterns(self.include, "--include")
        compile_patterns(self.exclude, "--exclude")
        min_params = getattr(self, "min_params", 0)
        if min_params < 0:
            raise ValueError(f"min_params must be >= 0, got {min_params}")
