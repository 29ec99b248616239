"""Outcome tallies shared by the fuzz harnesses: with MFCONVERT_FUZZ_STATS=FILE each module appends
its counts per test to FILE as JSON lines (the figures of BENCHMARKS.md's Reliability section)."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest


def stats_fixture(stats: dict[str, Counter]):
    """A module-scoped autouse fixture that writes `stats` when the module's tests are done."""
    @pytest.fixture(scope="module", autouse=True)
    def write_stats():
        yield
        path = os.environ.get("MFCONVERT_FUZZ_STATS")
        if path:
            with open(path, "a") as f:
                for test, counts in stats.items():
                    f.write(json.dumps({"test": test, **counts}) + "\n")
    return write_stats
