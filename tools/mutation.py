"""Mutation check: plant each bug of tools/mutants.py, one at a time, in a copy of the repository
and run the tests listed with it; a mutant is killed when they fail. `make mutation` runs it.

    .venv/bin/python tools/mutation.py [--rev HEAD] [--only NAME ...] [--keep] [--timeout 900]

The copy (a temporary directory named mfconvert/, so that `import mfconvert` and the tests'
`from tests…` resolve to it ahead of the editable install) holds the working tree's tracked and
untracked non-ignored files, or with --rev a commit's tree. Its custom-op library is compiled
there from its own sources (the flags of setup.py; objects cached, so a C++ mutant recompiles
only the files that include the mutated one). First every mutant's snippet must occur exactly
once in its file, and the unmutated copy must pass the union of the listed tests; then each
mutant is applied, tested and reverted. Exit status 0 when every mutant was killed.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutants import MUTANTS, Mutant  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fno-math-errno", "-ffp-contract=off",
            "-Wno-unused-parameter", "-Wno-unused-variable"]


def fail(msg: str) -> None:
    print(f"mfconvert: error: {msg}", file=sys.stderr)
    sys.exit(1)


def copy_tree(dest: str, rev: str | None) -> None:
    os.makedirs(dest)
    if rev:
        archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=False)
        if archive.returncode:
            fail(f"git archive {rev}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
        return
    files = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):            # a tracked file deleted in the working tree is skipped
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def ort_include_dir() -> str:
    """Where onnxruntime_c_api.h is: ORT_INCLUDE_DIR, a system install, or the headers `make build`
    fetched into build/ort-headers."""
    candidates = [os.environ.get("ORT_INCLUDE_DIR", ""), "/usr/include/onnxruntime", "/usr/local/include/onnxruntime"]
    candidates += sorted(os.path.dirname(p) for p in glob.glob(
        os.path.join(REPO, "build", "ort-headers", "**", "onnxruntime_c_api.h"), recursive=True))
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "onnxruntime_c_api.h")):
            return d
    fail("no ONNX Runtime headers (onnxruntime_c_api.h): run `make build` first or set ORT_INCLUDE_DIR")


class Library:
    """Builds <copy>/ort_ops/libmfconvert_ops.so from the copy's sources, one object per .cc."""

    def __init__(self, root: str, objdir: str, jobs: int):
        self.root, self.objdir, self.jobs = root, objdir, jobs
        self.src = os.path.join(root, "ort_ops", "src")
        self.include = ort_include_dir()
        os.makedirs(objdir, exist_ok=True)

    def sources(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.src, "*.cc")))

    def dependents(self, rel_path: str) -> list[str]:
        """The .cc files that are, or include (directly or through headers), the given file."""
        name = os.path.basename(rel_path)
        if name.endswith(".cc"):
            return [os.path.join(self.root, rel_path)]
        headers, grew = {name}, True
        texts = {p: open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(self.src, "*.[ch]*"))}
        while grew:
            grew = False
            for p, text in texts.items():
                base = os.path.basename(p)
                if base.endswith(".h") and base not in headers and any(f'#include "{h}"' in text for h in headers):
                    headers.add(base)
                    grew = True
        return [p for p, text in texts.items() if p.endswith(".cc") and any(f'#include "{h}"' in text for h in headers)]

    def compile(self, sources: list[str], tag: str = "") -> None:
        def one(src):
            obj = os.path.join(self.objdir, os.path.basename(src)[:-3] + tag + ".o")
            cmd = ["g++", *CXXFLAGS, "-I", self.src, "-I", self.include, "-c", src, "-o", obj]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd)}\n{out.stderr}")
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(one, sources))

    def link(self, replaced: list[str] = (), tag: str = "") -> None:
        objs = []
        for src in self.sources():
            stem = os.path.basename(src)[:-3]
            objs.append(os.path.join(self.objdir, stem + (tag if src in replaced else "") + ".o"))
        out = os.path.join(self.root, "ort_ops", "libmfconvert_ops.so")
        cmd = ["g++", "-shared", "-o", out + ".tmp", *objs,
               f"-Wl,--version-script={os.path.join(self.src, 'exports.map')}", "-pthread"]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(out + ".tmp", out)


def run_tests(root: str, args: list[str], timeout: float) -> tuple[int, float, str]:
    """(pytest's exit status (−1: timed out), seconds, its summary line and FAILED/ERROR lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MFCONVERT_OPS_LIBRARY", "MFCONVERT_ISA")}
    env.update(PYTHONPATH=os.path.dirname(root) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                             cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - t0, "timeout"
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else out.stderr.strip()[-300:]
    return out.returncode, time.monotonic() - t0, "\n".join([summary] + failed)


def first_failure(summary: str) -> str:
    return re.sub(r"\s+", " ", summary)[:160]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="copy this commit's tree instead of the working tree")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    args = ap.parse_args()
    mutants: list[Mutant] = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            fail(f"--only: no mutant named {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.name in args.only]

    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", args.rev or "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    if not args.rev and subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True).stdout.strip():
        commit += " + uncommitted changes"
    work = tempfile.mkdtemp(prefix="mfconvert-mutation-")
    root = os.path.join(work, "mfconvert")
    try:
        copy_tree(root, args.rev)
        bad = []
        for m in mutants:
            path = os.path.join(root, m.path)
            count = open(path, encoding="utf-8").read().count(m.original) if os.path.isfile(path) else 0
            if count != 1:
                bad.append(f"{m.name}: snippet found {count} times in {m.path}")
        if bad:
            fail("mutants that do not apply (fix tools/mutants.py):\n  " + "\n  ".join(bad))
        lib = Library(root, os.path.join(work, "obj"), args.jobs)
        t0 = time.monotonic()
        try:
            lib.compile(lib.sources())
        except RuntimeError as err:
            fail(f"building the unmutated library failed:\n{err}")
        lib.link()
        print(f"copy {root} of {commit} ({args.rev or 'working tree'}), library built in "
              f"{time.monotonic() - t0:.0f} s", flush=True)

        # The unmutated copy runs every mutant's tests: the plain file lists as one union, the
        # selections with options (-k …) each as given.
        union: list[str] = []
        selections: list[tuple[str, ...]] = []
        for m in mutants:
            if all(a.startswith("tests/") for a in m.tests):
                union += [f for f in m.tests if f not in union]
            elif m.tests not in selections:
                selections.append(m.tests)
        for sel in ([tuple(union)] if union else []) + selections:
            rc, secs, summary = run_tests(root, list(sel), args.timeout)
            print(f"unmutated copy: {summary} ({secs:.0f} s)", flush=True)
            if rc != 0:
                fail(f"the unmutated copy fails its tests ({summary}); nothing to measure")

        rows, survived = [], []
        for m in mutants:
            path = os.path.join(root, m.path)
            original = open(path, encoding="utf-8").read()
            cxx = m.path.startswith("ort_ops/src/")
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.original, m.replacement))
                if cxx:
                    changed = lib.dependents(m.path)
                    try:
                        lib.compile(changed, tag=".mutant")
                    except RuntimeError as err:
                        fail(f"{m.name}: the mutant does not compile:\n{err}")
                    lib.link(changed, tag=".mutant")
                rc, secs, summary = run_tests(root, list(m.tests), args.timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original)
                if cxx:
                    lib.link()
            verdict = "killed" if rc in (1, 2) else "timeout (killed)" if rc == -1 else \
                "SURVIVED" if rc == 0 else f"error (pytest exit {rc})"
            if rc == 0 or rc > 2:
                survived.append(m.name)
            tests = " ".join(a.removeprefix("tests/") for a in m.tests)
            caught = re.findall(r"^FAILED tests/(\S+)", summary, re.M) + re.findall(r"^ERROR tests/(\S+)", summary, re.M)
            by = f"`{caught[0]}`" if caught and rc in (1, 2) else ""
            rows.append(f"| `{m.name}` | {m.face} | `{m.path}` | {tests} | {verdict} | {by} | {secs:.0f} s |")
            print(f"{m.name}: {verdict} — {first_failure(summary)} ({secs:.0f} s)", flush=True)
        print("\n| mutant | face | file | tests run | result | first failing test | time |\n"
              "|---|---|---|---|---|---|---:|")
        print("\n".join(rows))
        print(f"\n{len(mutants) - len(survived)} of {len(mutants)} mutants killed at {commit}, "
              f"{time.strftime('%Y-%m-%d')}"
              + (f"; survived or errored: {', '.join(survived)}" if survived else ""))
        sys.exit(1 if survived else 0)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
