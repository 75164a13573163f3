"""Unlabeled text corpus for instruction backtranslation: read, normalise, segment, filter.

The backward model writes an instruction for each *segment* of human-written text.
:func:`load_corpus` reads documents (a ``.txt`` file; a directory of ``.txt`` files, sorted by
relative path; JSONL with the text in ``text_field`` and the other fields, ``id`` aside, kept
as ``meta``; ``hf:<dir>`` saved with ``datasets``' ``save_to_disk``, or a ``datasets.Dataset``
object; nothing is downloaded).  A ``.txt`` file is one document, unless ``txt_documents``
says every blank-line-separated block or every line is one.  Each document is normalised
(:func:`normalize_text`, optionally :func:`detokenize`), cut into segments
(:func:`split_segments`: paragraphs packed up to ``max_words``, over-long paragraphs cut at
sentence ends; or whole documents) and every segment is kept or dropped for the first reason
that applies: ``empty``, ``not_text`` (too few letters), ``too_short``, ``too_long``,
``duplicate`` (same lowercased text as an earlier kept segment), ``near_duplicate`` (word
shingle Jaccard >= threshold with an earlier kept segment: MinHash + LSH banding propose
candidates, the exact Jaccard decides), ``max_segments``.  Corpus order is preserved, the
first of a set of duplicates is kept, and segment ids depend only on the document id, the
segment's position in its document and its text, so they are stable across runs.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, create_model, model_validator

from selfalign.config import StrictModel
from selfalign.data.records import read_jsonl, record_id
from selfalign.errors import DataError

REASONS = ("empty", "not_text", "too_short", "too_long", "duplicate", "near_duplicate", "max_segments")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class CorpusSettings(StrictModel):
    """The unlabeled corpus (run config section ``corpus:``) and how it becomes segments."""

    source: str = Field(..., description="a .txt file, a directory of .txt files, a .jsonl file, or hf:<saved dir>")
    text_field: str = Field("text", description="JSONL field / dataset column holding the document text")
    txt_documents: Literal["file", "blank_line", "line"] = Field(
        "file", description="plain text: one document per file, per blank-line-separated block, or per line"
    )
    hf_split: str = Field("train", description="split to read when the saved dataset is a DatasetDict")
    segment: Literal["paragraph", "document"] = Field(
        "paragraph", description="paragraph: pack paragraphs into segments of <= max_words; document: whole documents"
    )
    min_words: int = Field(20, ge=1, description="shorter segments are dropped (too_short)")
    max_words: int = Field(400, ge=1, description="segment size limit; longer segments are dropped (too_long)")
    min_letter_fraction: float = Field(0.5, ge=0.0, le=1.0, description="letters / non-space characters (not_text)")
    detokenize: bool = Field(True, description="remove spaces before , . ! ? ; : % ) and n't 's, after (")
    near_duplicate_threshold: float | None = Field(
        0.8, gt=0.0, le=1.0, description="word-shingle Jaccard at which a segment is a near duplicate; null or 1 disables"
    )
    shingle_words: int = Field(5, ge=1, description="words per shingle for near-duplicate detection")
    minhash_permutations: int = Field(64, ge=4, le=1024, description="MinHash signature length (LSH candidates)")
    max_segments: int | None = Field(None, ge=1, description="keep only the first N segments that pass the filters")

    @model_validator(mode="after")
    def _bounds(self) -> CorpusSettings:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is larger than max_words ({self.max_words})")
        return self


@dataclass
class CorpusStats:
    """How many documents were read, segments made and kept, and why the others were dropped."""

    documents: int = 0
    segments: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        dropped = {r: int(self.dropped.get(r, 0)) for r in REASONS}
        return {"documents": self.documents, "segments": self.segments, "kept": self.kept, "dropped": dropped}

    def summary(self) -> str:
        why = ", ".join(f"{r} {self.dropped[r]}" for r in REASONS if self.dropped.get(r))
        return f"{self.documents} documents -> {self.segments} segments, kept {self.kept} (dropped: {why or 'none'})"


# --------------------------------------------------------------------------- text clean-up

_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None)  # zero-width chars, soft hyphen
_ODD_SPACE = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # space runs, tabs, no-break spaces...
# one pass; each alternative keeps its group and drops the space (input has single spaces)
_DETOKENIZE = re.compile(
    r" (?:([,.!?;:%]+)(?=\s|$)"  # "bay , I" -> "bay, I"
    r"|(?<=\w )((?i:n['\u2019]t|['\u2019](?:s|re|ve|ll|d|m))\b)"  # "do n't", "it 's" -> "don't", "it's"
    r"|(?<![(\[] )([)\]]))"  # "email )" -> "email)"; a "[ ]" checkbox is left alone
    r"|(?<!\S)([(\[]) (?=[^\s)\]])"  # "( see" -> "(see"; the emoticon ":(" is left alone
)


def detokenize(text: str) -> str:
    """Undo tokenizer-style spacing: ``"bay , I do n't ( see it )"`` -> ``"bay, I don't (see it)"``.

    Only single spaces are removed: before punctuation that is followed by a space or the
    end, before clitics, and inside brackets; emoticons such as ``:(`` and ``:)`` survive.
    """
    return _DETOKENIZE.sub(lambda m: m.group(m.lastindex), text)


def normalize_text(text: str, *, detokenize_text: bool = False) -> str:
    """NFC, invisible characters removed, spaces collapsed, lines stripped, one blank line
    between paragraphs (``"\\n\\n"``), single line breaks inside a paragraph kept."""
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    paragraphs: list[str] = []
    lines: list[str] = []
    for line in text.splitlines() + [""]:
        if "  " in line or not line.isprintable():  # a printable line has no whitespace but " "
            line = _ODD_SPACE.sub(" ", line)
        line = line.strip()
        if line:
            lines.append(line)
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    text = "\n\n".join(paragraphs)
    return detokenize(text) if detokenize_text else text


def count_words(text: str) -> int:
    """Whitespace-separated words of a *normalised* text (fast: no list is built)."""
    return text.count(" ") + text.count("\n") - text.count("\n\n") + 1 if text else 0


# --------------------------------------------------------------------------- segmentation

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


def _pack(units: list[tuple[str, str, int]], max_words: int) -> list[str]:
    """Pack (separator, text, words) units into segments of <= max_words words.  Cuts go where
    the running word count is nearest to multiples of total / ceil(total / max_words), so the
    segments come out about equal and no tiny tail is left over when it can be avoided."""
    total = sum(n for _, _, n in units)
    target = total / max(1, math.ceil(total / max_words))
    segments: list[str] = []
    current: list[str] = []
    size = done = 0  # words in the current segment / before it
    for sep, text, n in units:
        end = (len(segments) + 1) * target  # where the current segment should ideally end
        if current and (size + n > max_words or done + size + n - end > end - done - size):
            segments.append("".join(current))
            done, current, size = done + size, [], 0
        current.append(text if not current else sep + text)
        size += n
    if current:
        segments.append("".join(current))
    return segments


def split_segments(text: str, mode: str = "paragraph", max_words: int = 400) -> list[str]:
    """Segments of a normalised document (see :func:`normalize_text`), in order.

    ``document``: the whole text.  ``paragraph``: paragraphs packed into segments of at most
    ``max_words`` words; a paragraph over ``max_words`` is cut into sentences (and lines)
    first.  A single sentence over ``max_words`` stays one (too long) segment.
    """
    if mode == "document" or not text:
        return [text]
    units: list[tuple[str, str, int]] = []
    for paragraph in text.split("\n\n"):
        n = count_words(paragraph)
        if n <= max_words:
            units.append(("\n\n", paragraph, n))
            continue
        for li, line in enumerate(paragraph.split("\n")):
            for si, sentence in enumerate(s for s in _SENTENCE_END.split(line) if s):
                sep = "\n\n" if li == si == 0 else "\n" if si == 0 else " "
                units.append((sep, sentence, count_words(sentence)))
    return _pack(units, max_words)


# --------------------------------------------------------------------------- near duplicates

_U = np.uint64
_SHINGLE_CHUNK = 1 << 14  # shingles hashed at once: num_perm x 16k x 8 bytes stays in cache
_BYTE_CHUNK = 1 << 22  # text bytes tokenised at once
_WORD_BYTES = np.zeros(256, dtype=bool)  # after lower(): ASCII letters, digits, _ and any non-ASCII
_WORD_BYTES[list(b"0123456789_abcdefghijklmnopqrstuvwxyz")] = True
_WORD_BYTES[0x80:] = True
_POLY = 0x100000001B3


def _constants(tag: str, n: int) -> np.ndarray:
    """n odd 64-bit constants derived from sha256, identical on every platform and version."""
    vals = [int.from_bytes(hashlib.sha256(f"{tag}:{i}".encode()).digest()[:8], "little") | 1 for i in range(n)]
    return np.array(vals, dtype=_U)


def _powers(base: int, n: int) -> np.ndarray:
    p = np.full(n, base, dtype=_U)
    p[0] = 1
    return np.cumprod(p, out=p)  # wraps modulo 2**64


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of the lowercased texts (runs of ASCII letters, digits, ``_``
    and non-ASCII characters), concatenated, and each text's word count.  Vectorised over the
    UTF-8 bytes: a polynomial hash from prefix sums, then the splitmix64 finaliser."""
    encoded = [t.lower().encode("utf-8") for t in texts]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1)
    hashes, counts, lo = [], [], 0
    while lo < len(encoded):
        base = ends[lo - 1] if lo else 0
        hi = min(len(encoded), max(lo + 1, int(np.searchsorted(ends, base + _BYTE_CHUNK, side="right"))))
        data = np.frombuffer(b" ".join(encoded[lo:hi]) + b" ", dtype=np.uint8)
        edge = np.diff(_WORD_BYTES[data].view(np.int8), prepend=np.int8(0))
        starts, stops = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
        prefix = np.zeros(len(data) + 1, dtype=_U)
        np.cumsum(data.astype(_U) * _powers(_POLY, len(data)), out=prefix[1:])
        x = (prefix[stops] - prefix[starts]) * _powers(pow(_POLY, -1, 1 << 64), len(data))[starts]
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 1)):
            x ^= x >> _U(shift)
            x *= _U(mult)
        hashes.append(x)
        text_of_word = np.searchsorted(ends[lo:hi] - base, starts, side="right")
        counts.append(np.bincount(text_of_word, minlength=hi - lo))
        lo = hi
    return np.concatenate(hashes), np.concatenate(counts).astype(np.int64)


def shingle_hashes(texts: Sequence[str], shingle_words: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word ``shingle_words``-grams of each text, concatenated, and the
    offsets (``len(texts) + 1``) where each text's hashes start.  A text with fewer words
    counts as one shingle, so every text has at least one."""
    k = shingle_words
    word_hash, lengths = _word_hashes(texts)
    padded = np.maximum(lengths, k)  # short texts are padded with zero hashes
    pad_start = np.concatenate([[0], np.cumsum(padded)])
    seq = np.zeros(int(pad_start[-1]), dtype=_U)
    within = np.arange(len(word_hash)) - np.repeat(np.concatenate([[0], np.cumsum(lengths)])[:-1], lengths)
    seq[np.repeat(pad_start[:-1], lengths) + within] = word_hash
    mult = _constants("shingle", k)
    windows = np.zeros(len(seq) - k + 1, dtype=_U)
    for j in range(k):
        windows += seq[j : len(seq) - k + 1 + j] * mult[j]
    counts = padded - k + 1
    offsets = np.concatenate([[0], np.cumsum(counts)])
    starts = np.repeat(pad_start[:-1], counts) + (np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts))
    return windows[starts], offsets


def minhash_signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int = 64) -> np.ndarray:
    """MinHash signatures ``(len(offsets) - 1, num_perm)`` uint32 of the shingle sets given by
    :func:`shingle_hashes`; permutation p maps x to the top half of ``a_p * x + b_p`` (mod 2**64)."""
    a, b = _constants("minhash-a", num_perm)[:, None], _constants("minhash-b", num_perm)[:, None]
    n = len(offsets) - 1
    sig = np.empty((n, num_perm), dtype=np.uint32)
    lo = 0
    while lo < n:  # chunks of whole texts, about _SHINGLE_CHUNK shingles each
        hi = min(n, max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + _SHINGLE_CHUNK, side="right")) - 1))
        values = a * hashes[offsets[lo] : offsets[hi]]  # (num_perm, shingles): reduceat runs along rows
        values += b
        values >>= _U(32)
        sig[lo:hi] = np.minimum.reduceat(values, offsets[lo:hi] - offsets[lo], axis=1).T
        lo = hi
    return sig


def near_duplicates(
    texts: Sequence[str], threshold: float = 0.8, *, shingle_words: int = 5, num_perm: int = 64
) -> np.ndarray:
    """Boolean mask: True where a text's shingle Jaccard with an earlier *unmasked* text is >=
    ``threshold``.  LSH banding over MinHash signatures proposes candidates; the exact Jaccard of
    the shingle sets decides, so the result does not hinge on signature noise."""
    n = len(texts)
    dup = np.zeros(n, dtype=bool)
    if n < 2:
        return dup
    hashes, offsets = shingle_hashes(texts, shingle_words)
    sig = minhash_signatures(hashes, offsets, num_perm)
    # rows per band: the largest r (dividing num_perm) that still makes a pair at the threshold
    # an LSH candidate with probability >= 0.995; a larger r means fewer spurious candidates
    r = max((r for r in range(1, num_perm + 1) if num_perm % r == 0
             and 1 - (1 - threshold**r) ** (num_perm // r) >= 0.995), default=1)
    mix = _constants("band", r)
    keys = np.stack([(sig[:, i : i + r].astype(np.uint64) * mix).sum(axis=1) for i in range(0, num_perm, r)], axis=1)
    shared = np.zeros(n, dtype=bool)  # only texts sharing some band key with another can collide
    for col in keys.T:
        _, inverse, counts = np.unique(col, return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    for i in np.flatnonzero(shared).tolist():
        row = keys[i].tolist()
        candidates = sorted({j for band, key in zip(buckets, row) for j in band.get(key, ())})
        mine = np.unique(hashes[offsets[i] : offsets[i + 1]])
        for j in candidates:
            theirs = np.unique(hashes[offsets[j] : offsets[j + 1]])
            inter = np.intersect1d(mine, theirs, assume_unique=True).size
            if inter / (mine.size + theirs.size - inter) >= threshold:
                dup[i] = True
                break
        if not dup[i]:
            for band, key in zip(buckets, row):
                band.setdefault(key, []).append(i)
    return dup


# --------------------------------------------------------------------------- reading

Document = tuple[str, str, dict]  # (doc id, raw text, metadata)


def _txt_documents(path: Path, name: str, how: str) -> Iterator[Document]:
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:  # valid UTF-8 but no text: a binary file (or UTF-16) would pass the decode below
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}: not a text file (a NUL byte at byte {nul}, line {line}); the corpus must be UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}, line {line})") from None
    if how == "file":
        yield name, text, {"source_file": name}
        return
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip() and how == "line":
            yield f"{name}:{lineno}", line, {"source_file": name, "line": lineno}
        elif line.strip():
            start = start or lineno
            block.append(line)
        elif block:
            yield f"{name}:{start}", "\n".join(block), {"source_file": name, "line": start}
            block, start = [], 0


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    schema = create_model(
        "CorpusDocument", __config__=ConfigDict(extra="allow", strict=True), text=(str, Field(alias=text_field))
    )
    for k, doc in enumerate(read_jsonl(path, schema), start=1):
        extra = dict(doc.model_extra or {})
        rid = extra.pop("id", None)
        ok = isinstance(rid, (str, int)) and not isinstance(rid, bool)
        yield (str(rid) if ok else f"{path.name}#{k}"), doc.text, extra


def _dataset_documents(ds: Any, name: str, settings: CorpusSettings) -> Iterator[Document]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if settings.hf_split not in ds:
            raise DataError(f"{name}: no split {settings.hf_split!r} (splits: {', '.join(ds)}); set corpus.hf_split")
        ds = ds[settings.hf_split]
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{name}: expected a datasets.Dataset, got {type(ds).__name__}")
    col = settings.text_field
    if col not in ds.column_names:
        raise DataError(f"{name}: field {col!r} is missing (columns: {', '.join(ds.column_names)})")
    row = 0
    for batch in ds.iter(batch_size=1000):
        for i in range(len(batch[col])):
            text = batch[col][i]
            if not isinstance(text, str):
                raise DataError(f"{name} row {row}: field {col!r}: expected a string, got {type(text).__name__}")
            meta = {c: batch[c][i] for c in batch if c not in (col, "id")}
            rid = batch["id"][i] if "id" in batch else None
            ok = isinstance(rid, (str, int)) and not isinstance(rid, bool)
            yield (str(rid) if ok else f"row{row}"), text, meta
            row += 1


def iter_documents(settings: CorpusSettings, dataset: Any = None) -> Iterator[Document]:
    """(doc id, raw text, meta) of every document of the source, in corpus order."""
    if dataset is not None:
        yield from _dataset_documents(dataset, settings.source or "<dataset>", settings)
        return
    if settings.source.startswith("hf:"):
        import datasets

        path = Path(settings.source[3:]).expanduser()
        if not path.is_dir():
            raise DataError(f"{path}: not found (expected a directory written by datasets' save_to_disk)")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets raises assorted types for a bad directory
            raise DataError(f"{path}: cannot load a saved dataset ({type(e).__name__}: {e})") from None
        yield from _dataset_documents(ds, str(path), settings)
        return
    path = Path(settings.source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        if not files:
            hint = " (a directory saved with datasets' save_to_disk needs the prefix hf:)"
            raise DataError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files in this directory{hint}")
        for rel in files:
            yield from _txt_documents(path / rel, rel, settings.txt_documents)
    elif path.suffix.lower() in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, settings.text_field)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        yield from _txt_documents(path, path.name, settings.txt_documents)
    else:
        raise DataError(f"{path}: unsupported corpus file type {path.suffix!r} (expected .txt, a directory "
                        "of .txt files, .jsonl, or hf:<dataset dir>)")


# --------------------------------------------------------------------------- the pipeline

_LETTERS = re.compile(r"[^\W\d_]+")
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))


def _letter_fraction(text: str) -> float:
    """Letters / non-space characters of a normalised text."""
    visible = len(text) - text.count(" ") - text.count("\n")
    if not visible:
        return 0.0
    if text.isascii():
        raw = text.encode("ascii")
        return (len(raw) - len(raw.translate(None, _ASCII_LETTERS))) / visible
    return sum(map(len, _LETTERS.findall(text))) / visible


def load_corpus(settings: CorpusSettings | dict, dataset: Any = None) -> tuple[list[dict], CorpusStats]:
    """Read, normalise, segment and filter the corpus; return the kept segments and the counts.

    Each segment record is ``{"id", "kind": "segment", "doc_id", "segment_index", "text",
    "words", "meta"}`` in corpus order; ``segment_index`` is the position among all segments of
    its document (before filtering).  ``dataset``: an in-memory ``datasets.Dataset`` read
    instead of ``settings.source`` (which then only names it in messages).  Raises
    :class:`DataError` for unreadable input, naming the file, line (or row) and field.
    """
    if not isinstance(settings, CorpusSettings):
        settings = CorpusSettings.model_validate(settings)
    s = settings
    stats = CorpusStats()
    candidates: list[dict] = []
    seen: set[bytes] = set()
    for doc_id, raw, meta in iter_documents(s, dataset):
        stats.documents += 1
        text = normalize_text(raw, detokenize_text=s.detokenize)
        for index, segment in enumerate(split_segments(text, s.segment, s.max_words)):
            stats.segments += 1
            words = count_words(segment)
            reason = None
            if not words:
                reason = "empty"
            elif _letter_fraction(segment) < s.min_letter_fraction:
                reason = "not_text"
            elif words < s.min_words:
                reason = "too_short"
            elif words > s.max_words:
                reason = "too_long"
            else:
                flat = segment.lower().replace("\n", " ")
                key = hashlib.blake2b(flat.encode("utf-8"), digest_size=16).digest()
                reason = "duplicate" if key in seen else None
                seen.add(key)
            if reason:
                stats.dropped[reason] += 1
                continue
            digest = hashlib.sha256(segment.encode("utf-8")).hexdigest()[:16]
            rid = record_id("segment", doc_id, index, digest)
            candidates.append({"id": rid, "kind": "segment", "doc_id": doc_id, "segment_index": index,
                               "text": segment, "words": words, "meta": dict(meta)})
    threshold = s.near_duplicate_threshold
    if threshold is not None and threshold < 1.0 and len(candidates) > 1:
        mask = near_duplicates(
            [c["text"] for c in candidates], threshold, shingle_words=s.shingle_words, num_perm=s.minhash_permutations
        )
        stats.dropped["near_duplicate"] += int(mask.sum())
        candidates = [c for c, d in zip(candidates, mask.tolist()) if not d]
    if s.max_segments is not None and len(candidates) > s.max_segments:
        stats.dropped["max_segments"] += len(candidates) - s.max_segments
        candidates = candidates[: s.max_segments]
    stats.kept = len(candidates)
    return candidates, stats
