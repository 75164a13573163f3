"""Programmatic rewards for ``judge.kind: function`` and the statistics the learning check uses.

- :mod:`selfalign.rewards.constraints`: verifiable constraints, e.g.
  ``judge.function: selfalign.rewards.constraints:max_25_words`` (any ``max_<N>_words`` works).
- :mod:`selfalign.rewards.stats`: bootstrap confidence intervals over prompts, paired differences.
"""

from selfalign.rewards.constraints import (
    count_words,
    max_25_words,
    word_limit,
    word_limit_score,
)
from selfalign.rewards.stats import (
    Estimate,
    bootstrap_mean,
    paired_difference,
    per_prompt_means,
)

__all__ = [
    "Estimate",
    "bootstrap_mean",
    "count_words",
    "max_25_words",
    "paired_difference",
    "per_prompt_means",
    "word_limit",
    "word_limit_score",
]
