"""The kernel paths (MFCONVERT_ISA values) this CPU supports, by the test ort_ops/src/cpu_isa.cc
makes, read from /proc/cpuinfo so that a path which fails to build or run fails its tests
instead of silently dropping out of them."""
from __future__ import annotations


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_isas() -> list[str]:
    flags = cpu_flags()
    isas = ["scalar"]
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        isas.append("avx512")
    return isas
