"""Real English prose for calibrating and evaluating text models, found on this machine.

The source is the docstrings of the Python standard library (and, only if more sentences are
asked for than it holds, of site-packages, read just far enough), read with ``ast`` from the
source files without importing anything. Docstrings are split into paragraphs; code-like
paragraphs (doctests, indented blocks, parameter lists, section headers, bullet lists) are
dropped, the rest is split into sentences, and only clean sentences of 6-40 words are kept,
deduplicated.

Everything is deterministic: files are walked in sorted order and sampling uses
``random.Random(seed)``, so the same machine gives the same sentences on every run.
"""
from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
from pathlib import Path

MIN_WORDS = 6
MAX_WORDS = 40

# Directories whose docstrings are mostly test scaffolding, demos, or duplicates.
_SKIP_DIRS = {"test", "tests", "testing", "__pycache__", "idlelib", "lib2to3", "turtledemo",
              "site-packages", "dist-packages", "_vendor", "vendor", "ensurepip", "config-3"}

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Paragraph lines that mark code, markup or parameter lists rather than prose.
_CODE_LINE = re.compile(
    r"""^\s*(>>>|\.\.\.|\.\.\s|[-*+•]\s|\d+[.)]\s|[=\-~^"'`#]{3,}|:\w+|@|\$|%|\w+\s*:\s*$|
        [A-Za-z_][\w.]*\s*\(.*\)\s*(->.*)?$|[A-Za-z_][\w.]*\s*=)""", re.X)
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns?|Yields?|Raises|Examples?|Notes?|"
                      r"Attributes|See Also|References|Usage|Warning|Todo)\s*:?\s*$", re.I)
# Characters and tokens that do not occur in clean prose sentences.
_BAD_TOKEN = re.compile(r"(https?://|www\.|\w+\.\w+\(|\w_\w|__|``|`|[{}\[\]<>=|\\#@$%^~*]|"
                        r"\w\(|\(\)|::|->|\.py\b|\.\w+\.|\b[a-z]+[A-Z]\w*|\s[-+/]\s?\w+[-+/])")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]?[,;:.!?)\"']*$|^\(?[A-Za-z0-9][\w'-]*[,;:.!?)]*$")


def _site_package_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p not in roots and p.is_dir():
            roots.append(p)
    return roots


def _python_files(root: Path, is_site_packages: bool) -> list[Path]:
    files: list[Path] = []
    for d, dirs, names in os.walk(root):
        skip = _SKIP_DIRS - ({"site-packages", "dist-packages"} if is_site_packages else set())
        dirs[:] = sorted(x for x in dirs if x not in skip and not x.endswith((".dist-info",
                                                                             ".egg-info")))
        files.extend(Path(d) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _docstrings(path: Path) -> list[str]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _prose_paragraphs(doc: str) -> list[str]:
    """Paragraphs of a docstring that read as prose, each joined into a single line."""
    paragraphs = []
    block: list[str] = []
    in_code = False  # after a "...::" line the next indented paragraph is a literal block
    for line in doc.splitlines() + [""]:
        if line.strip():
            block.append(line)
            continue
        if block:
            text = " ".join(x.strip() for x in block)
            code = (any(_CODE_LINE.match(x) or _SECTION.match(x) for x in block)
                    or any(x[:1].isspace() for x in block)  # indented: code or a def list
                    or (in_code and block[0][:1].isspace()))
            if not code:
                paragraphs.append(text)
            in_code = block[-1].rstrip().endswith("::")
            block = []
    return paragraphs


def _clean_sentence(s: str) -> str | None:
    """The sentence if it looks like clean English prose, else None."""
    s = " ".join(s.split())
    if not s.isascii() or not s[:1].isupper() or s[-1:] not in ".!?":
        return None
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if _BAD_TOKEN.search(s) or s.count("(") > 1 or s.count("(") != s.count(")"):
        return None
    if re.search(r"\b(XXX|TODO|FIXME|NB)\b", s):
        return None  # developer notes, not prose
    if s.count('"') % 2 or s.count(":") > 1 or s.endswith(("e.g.", "i.e.", "etc.", ":.")):
        return None
    if not all(_WORD.match(w) for w in words):
        return None
    letters = sum(c.isalpha() for c in s)
    if letters < 0.8 * sum(not c.isspace() for c in s):
        return None
    # Mostly lower-case words: rules out titles, constant lists and ALL-CAPS notices.
    if sum(w[:1].islower() for w in words) < 0.6 * len(words):
        return None
    return s


def _sentences_in(files: list[Path], seen: set[str], out: list[str]) -> None:
    for path in files:
        for doc in _docstrings(path):
            for para in _prose_paragraphs(doc):
                for raw in _SENTENCE_SPLIT.split(para):
                    s = _clean_sentence(raw)
                    if s is None:
                        continue
                    key = s.lower()
                    if key not in seen:
                        seen.add(key)
                        out.append(s)


@functools.lru_cache(maxsize=1)
def _stdlib_pool() -> tuple[str, ...]:
    """All clean, distinct stdlib sentences, in a fixed order (sorted files, appearance)."""
    seen: set[str] = set()
    out: list[str] = []
    _sentences_in(_python_files(Path(sysconfig.get_paths()["stdlib"]), False), seen, out)
    return tuple(out)


def _site_package_files() -> list[Path]:
    return [f for root in _site_package_roots() for f in _python_files(root, True)]


def _extended_pool(min_size: int) -> tuple[str, ...]:
    """The stdlib pool followed by site-packages sentences, reading site-packages files in
    sorted order only until ``min_size`` sentences are available (a full scan takes ~30 s)."""
    seen = {s.lower() for s in _stdlib_pool()}
    out = list(_stdlib_pool())
    for path in _site_package_files():
        if len(out) >= min_size:
            break
        _sentences_in([path], seen, out)
    return tuple(out)


def pool(min_size: int = 0) -> tuple[str, ...]:
    """At least ``min_size`` distinct sentences in a fixed order: the standard library's
    (about 6,600 on CPython 3.11), extended from site-packages only when that is too few."""
    sents = _stdlib_pool()
    if len(sents) < min_size:
        sents = _extended_pool(min_size)
    if len(sents) < min_size:
        raise ValueError(f"only {len(sents)} distinct sentences available, {min_size} requested")
    return sents


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct natural-language sentences, deterministic for a given ``seed``.

    The standard library's sentences come first, shuffled; site-packages sentences, shuffled
    separately, follow only when ``n`` is larger. So a smaller ``n`` always gives a prefix of a
    larger one (same seed), and the first few thousand are stdlib prose whatever ``n`` is."""
    if n < 0:
        raise ValueError("n must be >= 0")
    everything = pool(n)
    stdlib = list(everything[: len(_stdlib_pool())])
    extra = list(everything[len(stdlib):])
    random.Random(seed).shuffle(stdlib)
    random.Random(seed + 1).shuffle(extra)
    return (stdlib + extra)[:n]


def split(sents: list[str], held_out_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Shuffle ``sents`` (deterministically) and split into (train, held_out) disjoint lists."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError("held_out_fraction must be in [0, 1]")
    order = list(dict.fromkeys(sents))  # drop duplicates, keep order
    random.Random(seed).shuffle(order)
    n_held = round(len(order) * held_out_fraction)
    return order[n_held:], order[:n_held]


def corpus(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (train, eval) sentence lists. The eval list depends only on ``n_eval`` and
    ``seed`` (stdlib sentences), so asking for more training data, even beyond the stdlib's,
    never changes the evaluation set."""
    both = sentences(n_eval + n_train, seed=seed)
    return both[n_eval:], both[:n_eval]


def read_text_file(path: str | os.PathLike) -> list[str]:
    """One example per line of a UTF-8 text file; surrounding whitespace stripped, blank lines
    skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
