"""selfalign: language models that improve themselves (Self-Rewarding, Meta-Rewarding, Humpback)."""

__version__ = "0.1.0"
