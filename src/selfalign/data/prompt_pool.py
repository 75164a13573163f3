"""A fixed prompt pool (``self_instruct.prompts``): prompts a run answers instead of writing its own.

Meta-Rewarding draws its training prompts from a fixed pool (20k prompts written once by
Llama-2-Chat-70B, 5k per iteration). The pool file is any prompt file :mod:`selfalign.data.prompt_sets`
reads (JSON strings, or objects with ``prompt``/``instruction``/``messages``/``turns``).

Draws are without replacement across iterations: the pool is put in one seeded order
(:func:`pool_order`), and iteration ``t`` takes the ``t``-th block of ``n`` prompts of it. The
draw is a function of the file, the seed, ``n`` and ``t`` alone, so a resumed run draws exactly
what it drew before; the recipe also writes each iteration's draw to its ``self_instruct``
stage, so a finished iteration never reads the pool again.
"""

from __future__ import annotations

import random
from pathlib import Path

from selfalign.data.prompt_sets import Prompt, load_prompts
from selfalign.errors import DataError


def pool_order(prompts: list[Prompt], seed: int) -> list[int]:
    """The seeded order in which the pool is consumed (a permutation of its indices)."""
    order = list(range(len(prompts)))
    random.Random(f"prompt-pool:{seed}").shuffle(order)
    return order


def draw_pool(path: str | Path, n: int, t: int, seed: int, *, key: str = "self_instruct.prompts") -> list[tuple[int, Prompt]]:
    """Iteration ``t``'s ``n`` prompts (``t`` counts from 1) as ``(index in the file, prompt)``.

    Raises :class:`DataError` naming ``key``, the file and the counts when the pool holds fewer
    than ``n * t`` distinct prompts (it never draws a prompt twice)."""
    if t < 1 or n < 1:
        raise ValueError("draw_pool: t and n count from 1")
    if not Path(path).is_file():
        raise DataError(f"{key}: prompt pool file not found: {path} (paths are relative to the directory the run starts in)")
    prompts = load_prompts(path)
    need = n * t
    if need > len(prompts):
        dup = f" ({prompts.duplicates} repeated prompts skipped)" if prompts.duplicates else ""
        raise DataError(
            f"{key}: {path} holds {len(prompts)} distinct prompts{dup}, but iteration {t} needs prompts "
            f"{n * (t - 1) + 1}-{need} ({n} per iteration, self_instruct.num_prompts; drawn without replacement): "
            f"add prompts, lower self_instruct.num_prompts, or lower iterations"
        )
    order = pool_order(list(prompts), seed)
    return [(i, prompts[i]) for i in order[n * (t - 1): need]]


def check_pool(path: str | Path, n: int, iterations: int, *, key: str = "self_instruct.prompts") -> None:
    """Validate the pool file (every line) and that it lasts ``iterations`` draws of ``n``."""
    draw_pool(path, n, iterations, 0, key=key)
