"""ROUGE-L similarity and the near-duplicate filter used when generating new prompts.

Contract
--------
:func:`rouge_l` gives the same number as the ``rouge-score`` package's
``RougeScorer(["rougeL"], use_stemmer=False).score(reference, candidate)["rougeL"].fmeasure``
(bit for bit: same tokens, same LCS, same float formula), without depending on that package:

* tokens: lowercase the text (``str.lower``), replace every run of characters outside
  ``[a-z0-9]`` by a space, split on whitespace - so non-ASCII letters separate tokens and
  are dropped, and punctuation-only text has no tokens;
* ``P = lcs / len(candidate)``, ``R = lcs / len(reference)``, ``F = 2*P*R / (P + R)``, and F is 0
  when either side has no tokens or nothing in common. F is symmetric in its two arguments.

The longest common subsequence comes from rapidfuzz (``LCSseq``, a bit-parallel C++
implementation). Each distinct token is mapped to one Unicode code point, so a token
sequence becomes a short ``str`` - the fastest input rapidfuzz has. (Past ~1.1 million
distinct tokens, sequences fall back to tuples of ints; results are the same, only slower.)

:class:`RougeFilter` keeps a pool of texts and answers "is this new text too close to any of
them?": ``accepts(text)`` is True iff ROUGE-L F against every pool entry is ``< threshold``
(Self-Instruct's rule with threshold 0.7). It only scores pool entries whose token count
leaves F >= threshold possible (F <= 2*min(a, b)/(a + b)), in one native ``cdist`` call.
Not thread-safe: guard a shared filter with a lock.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

__all__ = ["rouge_tokenize", "rouge_l", "lcs_fmeasure", "RougeFilter"]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SURROGATES = 0xE000 - 0xD800
_MAX_CODE_IDS = 0x110000 - _SURROGATES  # token ids that fit in one code point each


def rouge_tokenize(text: str) -> list[str]:
    """Tokens exactly as rouge-score's default tokenizer (no stemming) makes them."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_fmeasure(lcs: int, len_candidate: int, len_reference: int) -> float:
    """rouge-score's F-measure from an LCS length and the two token counts."""
    if lcs <= 0 or len_candidate <= 0 or len_reference <= 0:
        return 0.0
    p = lcs / len_candidate
    r = lcs / len_reference
    return 2 * p * r / (p + r)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure between two texts (see module docstring)."""
    ref, cand = rouge_tokenize(reference), rouge_tokenize(candidate)
    if not ref or not cand:
        return 0.0
    return lcs_fmeasure(int(LCSseq.similarity(ref, cand)), len(cand), len(ref))


def _fmeasure_array(lcs: np.ndarray, len_candidate: int, len_reference: np.ndarray) -> np.ndarray:
    """Vectorised :func:`lcs_fmeasure`, same operation order so results are bit-identical."""
    lcs = lcs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = lcs / float(len_candidate)
        r = lcs / len_reference.astype(np.float64)
        f = 2 * p * r / (p + r)
    return np.where(lcs > 0, f, 0.0)


def _length_window(n: int, threshold: float) -> tuple[int, int]:
    """Token counts m for which F >= threshold is possible against a text of n tokens.

    F <= 2*min(n, m)/(n + m); solving for m gives n*t/(2-t) <= m <= n*(2-t)/t. The window is
    widened by one on each side so float rounding can only add candidates, never lose one
    (the exact F of every candidate is computed afterwards).
    """
    lo = math.floor(n * threshold / (2 - threshold)) - 1
    hi = math.ceil(n * (2 - threshold) / threshold) + 1
    return max(lo, 1), hi


class RougeFilter:
    """A pool of texts with fast ROUGE-L near-duplicate checks.

    ``threshold`` in (0, 1]: ``accepts`` rejects a text whose F against some pool entry is
    ``>= threshold``. Indices returned by :meth:`max_score` and :meth:`add` are positions in
    insertion order. A text with no tokens scores 0 against everything (as in rouge-score), so
    the filter accepts it; reject empty prompts before filtering.
    """

    def __init__(self, threshold: float = 0.7, texts: Iterable[str] = ()):
        if not (0.0 < float(threshold) <= 1.0):
            raise ValueError(f"ROUGE-L threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._vocab: dict[str, int] = {}
        self._wide = False  # True once the vocabulary outgrew one-code-point-per-token
        self._texts: list[str] = []
        self._seqs: list[str | tuple[int, ...]] = []  # insertion order
        self._lens: list[int] = []
        # the same entries sorted by token count, for the length window
        self._by_len_keys: list[int] = []
        self._by_len_seqs: list[str | tuple[int, ...]] = []
        self._by_len_idx: list[int] = []
        self.extend(texts)

    # -- encoding ------------------------------------------------------------------------
    def _ids(self, tokens: list[str], grow: bool) -> list[int]:
        # id 0 is reserved for tokens of a query that no pool entry has: they can never be
        # part of a common subsequence, so one shared id is exact and keeps the vocabulary
        # from growing with every rejected text.
        vocab = self._vocab
        if grow:
            return [vocab.setdefault(t, len(vocab) + 1) for t in tokens]
        return [vocab.get(t, 0) for t in tokens]

    @staticmethod
    def _to_str(ids: list[int]) -> str:
        return "".join(chr(i if i < 0xD800 else i + _SURROGATES) for i in ids)

    @staticmethod
    def _from_str(seq: str) -> tuple[int, ...]:
        return tuple(c if c < 0xD800 else c - _SURROGATES for c in map(ord, seq))

    def _encode(self, text: str, grow: bool = False) -> str | tuple[int, ...]:
        ids = self._ids(rouge_tokenize(text), grow)
        if not self._wide and len(self._vocab) >= _MAX_CODE_IDS:
            self._go_wide()
        return tuple(ids) if self._wide else self._to_str(ids)

    def _go_wide(self) -> None:
        self._wide = True
        self._seqs = [self._from_str(s) if isinstance(s, str) else s for s in self._seqs]
        self._by_len_seqs = [self._seqs[i] for i in self._by_len_idx]

    # -- pool ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._texts)

    @property
    def texts(self) -> list[str]:
        """The pool, in insertion order (a copy)."""
        return list(self._texts)

    def add(self, text: str) -> int:
        """Add a text to the pool (no check); returns its index."""
        seq = self._encode(text, grow=True)
        idx = len(self._texts)
        self._texts.append(text)
        self._seqs.append(seq)
        self._lens.append(len(seq))
        pos = bisect.bisect_right(self._by_len_keys, len(seq))
        self._by_len_keys.insert(pos, len(seq))
        self._by_len_seqs.insert(pos, seq)
        self._by_len_idx.insert(pos, idx)
        return idx

    def extend(self, texts: Iterable[str]) -> None:
        for t in texts:
            self.add(t)

    # -- queries -------------------------------------------------------------------------
    def max_score(self, text: str) -> tuple[float, int | None]:
        """Highest F against the pool and the index of that entry (the earliest on ties).

        ``(0.0, None)`` when the pool is empty; ``(0.0, 0)`` when nothing overlaps.
        """
        if not self._seqs:
            return 0.0, None
        seq = self._encode(text)
        if not seq:
            return 0.0, 0
        lcs = process.cdist([seq], self._seqs, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
        f = _fmeasure_array(lcs, len(seq), np.asarray(self._lens))
        best = int(np.argmax(f))
        return float(f[best]), best

    def first_match(self, text: str) -> tuple[float, int] | None:
        """Some pool entry with F >= threshold, as (F, index) - the earliest such entry - or
        None when the text is accepted. Only entries of a feasible length are scored."""
        seq = self._encode(text)
        n = len(seq)
        if n == 0 or not self._seqs:
            return None
        lo, hi = _length_window(n, self.threshold)
        a = bisect.bisect_left(self._by_len_keys, lo)
        b = bisect.bisect_right(self._by_len_keys, hi)
        if a >= b:
            return None
        # an LCS below this cannot reach the threshold (again widened by one for rounding)
        cutoff = max(0, math.floor(self.threshold * (n + lo) / 2) - 1)
        lcs = process.cdist(
            [seq], self._by_len_seqs[a:b], scorer=LCSseq.similarity, dtype=np.int32, workers=1, score_cutoff=cutoff
        )[0]
        f = _fmeasure_array(lcs, n, np.asarray(self._by_len_keys[a:b]))
        hits = np.flatnonzero(f >= self.threshold)
        if hits.size == 0:
            return None
        idx = np.asarray(self._by_len_idx[a:b])[hits]
        k = int(np.argmin(idx))
        return float(f[hits[k]]), int(idx[k])

    def accepts(self, text: str) -> bool:
        """True iff ROUGE-L F of ``text`` against every pool entry is below the threshold."""
        return self.first_match(text) is None

    def offer(self, text: str) -> bool:
        """Add ``text`` if it is accepted; returns whether it was added."""
        if self.accepts(text):
            self.add(text)
            return True
        return False
