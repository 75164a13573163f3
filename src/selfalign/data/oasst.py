"""OpenAssistant conversation trees: loading, IFT examples, EFT reply groups, agreement filter.

:func:`load_oasst` reads both layouts into one model (:class:`Tree` of :class:`Message`),
deciding per file from its first record: the nested tree export (one tree a line, ``{"prompt":
{message..., "replies": [...]}}``) or the Hugging Face flat layout (one message a line with
``message_id`` and ``parent_id``, null for a root; trees may be interleaved in any order).
Every message needs ``message_id``, ``role`` (``prompter``/``assistant``) and ``text``; ``lang``,
``rank`` (int, integral float as in the HF parquet, or null), ``deleted`` and ``synthetic`` are
optional; other fields are ignored; children keep file order.  In the flat layout a message
whose parent is not in the data (a language-filtered export) is left out with all its replies
and counted in the result's ``dropped["orphan"]`` (:class:`TreeList`).  Every problem raises
:class:`DataError` ``"<file>:<line>: field '<path>': <problem>"`` (duplicate ids, parent
links that form a cycle, a root that is not a prompter message, a bad field).

:func:`build_ift` makes supervised examples (first prompt + its rank-0 reply), :func:`eft_groups`
collects human-ranked reply sets, :func:`agrees_with_human` checks a judge's scores against the
human ranking and :func:`split_train_heldout` splits by a seeded hash of the ids.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from selfalign.data.records import record_id
from selfalign.errors import DataError

ROLES = ("prompter", "assistant")
_CHAT_ROLE = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Message:
    """One message; ``rank`` orders assistant siblings (0 = best), None when unranked."""

    id: str
    parent_id: str | None
    role: str
    text: str
    lang: str | None = None
    rank: int | None = None
    synthetic: bool = False
    deleted: bool = False
    children: list[Message] = field(default_factory=list)

    def walk(self) -> Iterator[Message]:
        """This message and all its descendants, depth first, children in order."""
        stack = [self]
        while stack:
            m = stack.pop()
            yield m
            stack.extend(reversed(m.children))


@dataclass
class Tree:
    """A conversation tree; its id is the root (first prompter) message id."""

    root: Message

    @property
    def id(self) -> str:
        return self.root.id


# --------------------------------------------------------------------------- field checks


_NULL = type(None)


def _bad(where: str, path: str, key: str, problem: str) -> DataError:
    return DataError(f"{where}: field '{f'{path}.{key}' if path else key}': {problem}")


def _get(obj: dict, key: str, where: str, path: str, kinds: tuple, default: Any = ...) -> Any:
    """``obj[key]`` checked against ``kinds``; a missing key is an error unless a default is given."""
    if key not in obj:
        if default is ...:
            raise _bad(where, path, key, "missing")
        return default
    value = obj[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join("null" if k is _NULL else k.__name__ for k in kinds)
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise _bad(where, path, key, f"expected {wanted} (got {shown})")
    return value


def _message(obj: Any, where: str, path: str, parent_id: str | None, *, flat: bool) -> Message:
    """Validate one message object (not its replies) and build a :class:`Message`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: field '{path or '<record>'}': expected an object, got {type(obj).__name__}")
    mid = _get(obj, "message_id", where, path, (str,))
    if not mid:
        raise _bad(where, path, "message_id", "empty")
    role = _get(obj, "role", where, path, (str,))
    if role not in ROLES:
        raise _bad(where, path, "role", f"unknown role {role!r} (expected 'prompter' or 'assistant')")
    text = _get(obj, "text", where, path, (str,))
    if flat:
        parent_id = _get(obj, "parent_id", where, path, (str, _NULL))
    elif (given := _get(obj, "parent_id", where, path, (str, _NULL), None)) not in (None, parent_id):
        what = f"it is a reply to {parent_id!r}" if parent_id else "the tree's root has no parent"
        raise _bad(where, path, "parent_id", f"{given!r}, but {what}")
    rank = _get(obj, "rank", where, path, (int, float, _NULL), None)
    if isinstance(rank, float) and math.isnan(rank):
        rank = None
    if rank is not None:
        if rank < 0 or not float(rank).is_integer():
            raise _bad(where, path, "rank", f"expected a whole number >= 0 (got {rank!r})")
        rank = int(rank)
    return Message(
        id=mid,
        parent_id=parent_id,
        role=role,
        text=text,
        lang=_get(obj, "lang", where, path, (str, _NULL), None),
        rank=rank,
        synthetic=_get(obj, "synthetic", where, path, (bool,), False),
        deleted=_get(obj, "deleted", where, path, (bool,), False),
    )


# --------------------------------------------------------------------------- the two layouts


def _nested_tree(record: dict, where: str, seen: dict[str, str]) -> Tree:
    """A nested export record -> Tree; ``seen`` maps message ids to where they were first read."""
    prompt = _get(record, "prompt", where, "", (dict,))
    root = _message(prompt, where, "prompt", None, flat=False)
    if root.role != "prompter":
        raise _bad(where, "prompt", "role", "a tree's root must be a prompter message")
    stack = [(prompt, root, "prompt")]
    while stack:
        obj, msg, path = stack.pop()
        if msg.id in seen:
            raise DataError(f"{where}: field '{path}.message_id': duplicate message id {msg.id!r} (first seen at {seen[msg.id]})")
        seen[msg.id] = where
        replies = _get(obj, "replies", where, path, (list,), [])
        for i, child in enumerate(replies):
            cpath = f"{path}.replies[{i}]"
            cmsg = _message(child, where, cpath, msg.id, flat=False)
            msg.children.append(cmsg)
            stack.append((child, cmsg, cpath))
    return Tree(root)


class TreeList(list):
    """:func:`load_oasst`'s output: the trees, plus ``dropped`` (a Counter of reasons).

    ``dropped["orphan"]`` counts the subtrees of a flat file left out because their first
    message's parent is not in the data (an export filtered by language, say, keeps an English
    reply to a prompt in another language); :func:`build_ift` and :func:`eft_groups` carry
    these counts into their own ``dropped``."""

    dropped: Counter

    def __init__(self, trees: Iterable[Tree] = (), dropped: Counter | None = None) -> None:
        super().__init__(trees)
        self.dropped = Counter(dropped or {})


def _flat_trees(rows: Iterable[tuple[str, dict]]) -> TreeList:
    """Flat message rows (``where``, object) -> trees, in order of their roots.

    A message whose parent is not in the data is an orphan: it and all its descendants are left
    out, counted once per orphan under ``dropped["orphan"]``. Duplicate ids, a root that is not a
    prompter message and parent links that form a cycle are errors."""
    msgs: dict[str, Message] = {}
    where_of: dict[str, str] = {}
    for where, obj in rows:
        m = _message(obj, where, "", None, flat=True)
        if m.id in msgs:
            raise DataError(f"{where}: field 'message_id': duplicate message id {m.id!r} (first seen at {where_of[m.id]})")
        msgs[m.id], where_of[m.id] = m, where
    roots, orphans = [], []
    for mid, m in msgs.items():
        if m.parent_id is None:
            if m.role != "prompter":
                raise DataError(f"{where_of[mid]}: field 'role': a tree's root (no parent) must be a prompter message")
            roots.append(m)
        elif m.parent_id not in msgs:
            orphans.append(m)
        else:
            msgs[m.parent_id].children.append(m)
    reached = {m.id for r in roots + orphans for m in r.walk()}
    for mid in (m for m in msgs if m not in reached):  # unreached = on or below a parent-link loop
        path = [mid]
        while (up := msgs[path[-1]].parent_id) not in path:
            path.append(up)
        loop = path[path.index(up):] + [up]
        raise DataError(f"{where_of[up]}: field 'parent_id': the parent links form a cycle ({' -> '.join(loop)})")
    return TreeList((Tree(r) for r in roots), Counter({"orphan": len(orphans)}) if orphans else None)


def _read_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for every non-blank line; ``.gz`` files are decompressed."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig")  # tolerates a byte order mark
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
            yield where, value


def load_oasst_file(path: str | Path) -> TreeList:
    """Read one JSONL (or ``.jsonl.gz``) file in either layout; the first record decides which."""
    path = Path(path)
    objects = _read_objects(path)
    first = next(objects, None)
    if first is None:
        raise DataError(f"{path}: no records (the file is empty)")
    where, obj = first
    if "prompt" in obj:
        seen: dict[str, str] = {}
        trees = TreeList([_nested_tree(obj, where, seen)])
        trees.extend(_nested_tree(o, w, seen) for w, o in objects)
        return trees
    if "message_id" in obj:
        return _flat_trees(itertools.chain([first], objects))
    raise DataError(f"{where}: cannot tell the layout: expected field 'prompt' (nested tree export) "
                    f"or 'message_id' (flat message layout)")


def load_oasst(source: str | Path, *, split: str = "train") -> TreeList:
    """Trees from a local file (either layout) or, when no such file exists, a hub dataset name.

    A name such as ``"OpenAssistant/oasst1"`` is loaded with ``datasets.load_dataset(name,
    split=split)`` (flat layout; needs the network or a warm cache).  Any failure to fetch it
    raises :class:`DataError`; rows are validated like file lines, ``where`` = ``name[split]:row``.
    """
    path = Path(source)
    hub_like = "/" in str(source) and path.suffix not in (".jsonl", ".gz", ".json")  # "owner/name"
    if path.exists() or isinstance(source, Path) or not hub_like:
        return load_oasst_file(path)
    name = str(source)
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split)
    except Exception as e:  # network, unknown name, missing split, offline mode...
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{name}: not a local file, and loading it as a hub dataset (split {split!r}) "
                        f"failed: {type(e).__name__}: {first_line}") from None
    if len(ds) == 0:
        raise DataError(f"{name}[{split}]: no records (the split is empty)")
    return _flat_trees((f"{name}[{split}]:{i}", dict(row)) for i, row in enumerate(ds))


# --------------------------------------------------------------------------- IFT examples


class IftResult(NamedTuple):
    """:func:`build_ift`'s output; unpacks as ``examples, dropped = build_ift(...)``."""

    examples: list[dict]
    dropped: Counter  # reason -> number of trees left out


def _why_not(m: Message, lang: Sequence[str] | None, include_synthetic: bool, include_deleted: bool) -> str | None:
    """The first reason a message is filtered out, or None if it passes."""
    if lang is not None and m.lang not in lang:
        return "lang"
    if m.synthetic and not include_synthetic:
        return "synthetic"
    if m.deleted and not include_deleted:
        return "deleted"
    if not m.text.strip():
        return "empty_text"
    return None


def build_ift(
    trees: Iterable[Tree],
    *,
    lang: str | Sequence[str] | None = ("en",),
    include_synthetic: bool = False,
    include_deleted: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
) -> IftResult:
    """One chat example per tree: the root prompt and its rank-0 assistant reply.

    A tree is dropped, counted under the first reason that applies: the root fails the filters
    (``lang`` - None accepts every language - , ``synthetic``, ``deleted``, ``empty_text``);
    no assistant reply has rank 0 (``no_ranked_reply``); the rank-0 reply fails the filters
    (``reply_lang``, ``reply_synthetic``, ...; lower-ranked replies are never promoted); or
    ``max_examples`` keeps a seeded random subset (``max_examples``, input order preserved).
    ``dropped`` also carries the loader's counts when ``trees`` is a :class:`TreeList`
    (``orphan``: subtrees whose parent message is not in the file).
    Example: ``{"id", "kind": "example", "task": "ift", "messages": [user, assistant],
    "source": "oasst:<root message id>"}`` with ``id = record_id("oasst-ift", root, reply)``.
    """
    langs = (lang,) if isinstance(lang, str) else lang
    examples: list[dict] = []
    dropped: Counter = Counter(getattr(trees, "dropped", None) or {})  # orphan subtrees the loader left out
    for tree in trees:
        root = tree.root
        why = _why_not(root, langs, include_synthetic, include_deleted)
        best = next((c for c in root.children if c.role == "assistant" and c.rank == 0), None)
        if why is None and best is None:
            why = "no_ranked_reply"
        if why is None:
            reply_why = _why_not(best, langs, include_synthetic, include_deleted)
            why = f"reply_{reply_why}" if reply_why else None
        if why is not None:
            dropped[why] += 1
            continue
        chat = [{"role": "user", "content": root.text}, {"role": "assistant", "content": best.text}]
        examples.append({"id": record_id("oasst-ift", root.id, best.id), "kind": "example", "task": "ift",
                         "messages": chat, "source": f"oasst:{root.id}"})
    if max_examples is not None and len(examples) > max_examples:
        keep = set(random.Random(seed).sample(range(len(examples)), max(max_examples, 0)))
        dropped["max_examples"] += len(examples) - len(keep)
        examples = [e for i, e in enumerate(examples) if i in keep]
    return IftResult(examples, dropped)


# --------------------------------------------------------------------------- EFT reply groups


class GroupList(list):
    """:func:`eft_groups`'s output: the groups, plus ``dropped`` (a Counter of reasons)."""

    dropped: Counter


def eft_groups(
    trees: Iterable[Tree],
    *,
    lang: str | Sequence[str] | None = ("en",),
    min_replies: int = 2,
    first_turn_only: bool = True,
    include_synthetic: bool = False,
    include_deleted: bool = False,
) -> GroupList:
    """Prompter turns with at least ``min_replies`` ranked assistant replies that pass the filters.

    Each group is ``{"prompt_id", "prompt": <that turn's text>, "messages": <the conversation up
    to and including that turn, as user/assistant chat messages>, "depth": <0 for a first turn>,
    "replies": [{"id", "text", "rank"}, ...]}``; replies keep their sibling order and their
    original ranks (which may have gaps once some are filtered out).  ``dropped`` counts turns
    left out: the turn itself fails the filters (``lang``, ``synthetic``...), or too few ranked
    replies remain (``too_few_ranked``).  Deeper turns whose own context fails are not visited.
    ``dropped`` also carries the loader's counts when ``trees`` is a :class:`TreeList`
    (``orphan``: subtrees whose parent message is not in the file).
    """
    langs = (lang,) if isinstance(lang, str) else lang
    groups = GroupList()
    groups.dropped = Counter(getattr(trees, "dropped", None) or {})  # orphan subtrees the loader left out
    for tree in trees:
        stack: list[tuple[Message, list[dict], int]] = [(tree.root, [], 0)]
        while stack:
            msg, context, depth = stack.pop()
            why = _why_not(msg, langs, include_synthetic, include_deleted)
            if why is not None:
                if msg.role == "prompter":
                    groups.dropped[why] += 1
                continue
            convo = context + [{"role": _CHAT_ROLE[msg.role], "content": msg.text}]
            if msg.role == "prompter":
                ranked = [
                    c for c in msg.children
                    if c.role == "assistant" and c.rank is not None
                    and _why_not(c, langs, include_synthetic, include_deleted) is None
                ]
                if len(ranked) >= min_replies:
                    replies = [{"id": c.id, "text": c.text, "rank": c.rank} for c in ranked]
                    groups.append({"prompt_id": msg.id, "prompt": msg.text, "messages": convo,
                                   "depth": depth, "replies": replies})
                else:
                    groups.dropped["too_few_ranked"] += 1
                if first_turn_only:
                    continue
            for child in reversed(msg.children):
                stack.append((child, convo, depth + (child.role == "prompter")))
    return groups


# --------------------------------------------------------------------------- agreement and split


def agrees_with_human(model_scores: Sequence[float | None], human_ranks: Sequence[int], ties: str = "drop") -> bool:
    """Do the judge's scores order the replies as the human ranks do (rank 0 = best = highest)?

    For every pair whose human ranks differ, the better-ranked reply must score higher.
    ``ties="drop"``: an equal score on such a pair is a disagreement; ``ties="allow"``: equal
    scores are tolerated, only a strict inversion disagrees.  A None or NaN score (an
    unparsable judgment) is always a disagreement.  Replies with equal human ranks are not
    compared.  Raises ValueError for mismatched lengths or an unknown ``ties``.
    """
    if ties not in ("drop", "allow"):
        raise ValueError(f"ties must be 'drop' or 'allow', got {ties!r}")
    if len(model_scores) != len(human_ranks):
        raise ValueError(f"{len(model_scores)} scores for {len(human_ranks)} ranked replies")
    if any(s is None or (isinstance(s, float) and math.isnan(s)) for s in model_scores):
        return False
    for (rank_a, score_a), (rank_b, score_b) in itertools.permutations(zip(human_ranks, model_scores), 2):
        if rank_a < rank_b and (score_a < score_b or (score_a == score_b and ties == "drop")):
            return False  # a is the better reply but does not score higher
    return True


def _default_key(item: Any) -> str:
    if isinstance(item, dict):
        for k in ("id", "prompt_id"):
            if k in item:
                return str(item[k])
    raise ValueError(f"cannot find an 'id' or 'prompt_id' in {item!r:.80}; pass key=")


def split_train_heldout(
    items: Sequence[Any], heldout_fraction: float, seed: int = 0, *, key: Callable[[Any], str] = _default_key
) -> tuple[list, list]:
    """Split ``items`` into (train, heldout) by a seeded hash of each item's id.

    The ``round(n * heldout_fraction)`` items with the smallest ``sha256(seed, id)`` are held
    out (at least one when the fraction is > 0 and n > 1); which items those are depends only
    on the set of ids and the seed, never on their order or on the run.  Both lists keep the
    input order.  Ids (``key(item)``, by default ``item["id"]`` or ``item["prompt_id"]``) must
    be unique.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be within [0, 1], got {heldout_fraction}")
    ids = [key(it) for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"duplicate id {dup!r}: the split needs unique ids")
    k = round(len(ids) * heldout_fraction)
    k = 1 if heldout_fraction > 0 and k == 0 and len(ids) > 1 else k
    digest = {i: hashlib.sha256(f"{seed}\x00{i}".encode()).hexdigest() for i in ids}
    held = set(sorted(ids, key=lambda i: (digest[i], i))[:k])
    train = [it for it, i in zip(items, ids) if i not in held]
    heldout = [it for it, i in zip(items, ids) if i in held]
    return train, heldout
