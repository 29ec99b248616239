"""calibrate/text.py: deterministic, disjoint, prose-like sentences from local docstrings."""
import re

import pytest

from mfconvert.calibrate import text


def test_requested_count_distinct():
    sents = text.sentences(2000, seed=0)
    assert len(sents) == 2000
    assert len({s.lower() for s in sents}) == 2000
    assert text.sentences(0) == []
    assert len(text.sentences(5, seed=1)) == 5


def test_deterministic():
    a = text.sentences(300, seed=0)
    text._stdlib_pool.cache_clear()  # really rebuild from the files, not the in-memory cache
    assert text.sentences(300, seed=0) == a
    assert text.sentences(300, seed=1) != a
    # A smaller request with the same seed is a prefix: the shuffle does not depend on n.
    assert text.sentences(100, seed=0) == a[:100]


def test_sentences_look_like_prose():
    for s in text.sentences(1000, seed=0):
        words = s.split()
        assert text.MIN_WORDS <= len(words) <= text.MAX_WORDS, s
        assert s[0].isupper() and s[-1] in ".!?", s
        assert ">>>" not in s and "http" not in s and "www." not in s, s
        assert s.count("(") <= 1 and "()" not in s and "=" not in s, s
        assert not re.search(r"\w_\w|__|`|[{}\[\]]|:param", s), s
        assert sum(c.isalpha() for c in s) >= 0.8 * sum(not c.isspace() for c in s), s


def test_corpus_disjoint_and_eval_stable():
    train, ev = text.corpus(500, 200, seed=0)
    assert len(train) == 500 and len(ev) == 200
    assert not set(train) & set(ev)
    _, ev2 = text.corpus(1000, 200, seed=0)
    assert ev2 == ev  # more calibration data never changes the evaluation set
    assert text.corpus(500, 200, seed=3)[1] != ev


def test_split():
    sents = text.sentences(100, seed=0)
    train, held = text.split(sents, 0.25)
    assert len(held) == 25 and len(train) == 75
    assert not set(train) & set(held) and set(train) | set(held) == set(sents)
    assert text.split(sents, 0.25) == (train, held)
    assert text.split(sents, 0.0)[1] == [] and text.split(sents, 1.0)[0] == []
    with pytest.raises(ValueError):
        text.split(sents, 1.5)


def test_beyond_stdlib_uses_site_packages():
    n_stdlib = len(text.pool())
    more = text.sentences(n_stdlib + 50, seed=0)
    assert len(more) == n_stdlib + 50 and len(set(more)) == n_stdlib + 50
    # The stdlib sentences keep their order; the site-packages ones only follow them.
    assert more[:n_stdlib] == text.sentences(n_stdlib, seed=0)
    train, ev = text.corpus(n_stdlib, 200, seed=0)
    assert ev == text.corpus(500, 200, seed=0)[1] and not set(train) & set(ev)


def test_too_many_requested(monkeypatch):
    monkeypatch.setattr(text, "_site_package_files", lambda: [])  # a full scan takes ~30 s
    with pytest.raises(ValueError, match="requested"):
        text.sentences(len(text.pool()) + 1)


def test_read_text_file(tmp_path):
    p = tmp_path / "ex.txt"
    p.write_text("First example.\n\n   \n  Second example, indented.  \nThird\n", encoding="utf-8")
    assert text.read_text_file(p) == ["First example.", "Second example, indented.", "Third"]
    assert text.read_text_file(str(p))[0] == "First example."
