"""Which model plays each role of an iteration: prompt writer, actor, judge, meta-judge.

Each role's ``model`` setting (``self_instruct.model``, ``respond.model``, ``judge.model``,
``meta_judge.model``) is one of

- ``current``: M_t, the model the iteration trains (a new one every iteration);
- ``base``: the run's ``model.spec`` as loaded, the model before any training;
- any other string: a model spec (hub id, local directory, ``.gguf`` file, ``smollm2-135m-instruct``)
  run on the run's engine;
- ``{spec, dtype, engine}``: a model on its own engine, e.g. an OpenAI-compatible endpoint.

Everything but ``current`` is *fixed*: it is never trained (training only ever starts from
M_t), and it is loaded once per run and kept for the next iteration. Two local models do not
share a GPU: where generation runs on a GPU, loading one closes the other (a fixed model is then
reloaded in the next iteration; it still never changes). A fixed role that names the same
weights as M_t (``base`` in a run without SFT, iteration 1) uses M_t's engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfalign.config import EngineConfig, ModelConfig
from selfalign.engines import create_engine
from selfalign.errors import ModelError

ROLES = ("self_instruct", "respond", "judge", "meta_judge")


@dataclass(frozen=True)
class FixedModel:
    """A fixed role model: what to load and with which engine."""

    key: str  # what identifies it (the resolved path or the served name, and the engine kind)
    label: str  # what the metrics and logs show
    model: ModelConfig
    engine: EngineConfig


def role_setting(cfg, role: str):
    """The ``model`` setting of ``role`` in ``cfg``; ``current`` where the config has no such section
    or the role generates nothing (a prompt pool replaces the writer; a non-LLM judge)."""
    section = getattr(cfg, role, None)
    if role == "self_instruct" and getattr(section, "prompts", None):
        return "current"
    if role == "judge" and getattr(section, "kind", "llm") != "llm":
        return "current"
    return getattr(section, "model", "current") if section is not None else "current"


def resolve_role(cfg, role: str) -> FixedModel | None:
    """The fixed model ``role`` runs on, or None for M_t. A model that cannot be resolved raises
    :class:`ModelError` naming the key (``<role>.model``)."""
    from selfalign.models import resolve_model
    from selfalign.recipes.config import RoleModelConfig

    value = role_setting(cfg, role)
    if value == "current":
        return None
    if isinstance(value, RoleModelConfig):
        spec, dtype, engine = value.spec, value.dtype, value.engine or cfg.engine
    elif value == "base":
        spec, dtype, engine = cfg.model.spec, cfg.model.dtype, cfg.engine
    else:
        spec, dtype, engine = value, cfg.model.dtype, cfg.engine
    if engine.kind == "openai":  # served elsewhere: the spec is the served model's name
        if not engine.base_url:
            raise ModelError(f"{role}.model: engine kind 'openai' needs engine.base_url (the server's /v1 address)")
        return FixedModel(f"openai:{engine.base_url}:{engine.served_model or spec}", f"{spec} @ {engine.base_url}",
                          ModelConfig(spec=spec, dtype=dtype), engine)
    try:
        path = resolve_model(spec, dtype=dtype)
    except ModelError as e:
        raise ModelError(f"{role}.model: {spec!r}: {e}") from None
    return FixedModel(f"{engine.kind}:{path}", str(path), ModelConfig(spec=str(path), dtype=dtype), engine)


def check_roles(cfg) -> None:
    """Resolve every fixed role model (preflight): a missing or unreachable model fails at once."""
    for role in ROLES:
        resolve_role(cfg, role)


class RoleEngines:
    """The engines of a run's roles. ``current`` is M_t's lazily loaded
    :class:`~selfalign.recipes.steps.GenerationModel`, set per iteration; fixed models are
    created on first use and kept until :meth:`close`."""

    def __init__(self, cfg, log) -> None:
        self.cfg, self.log = cfg, log
        self.current = None
        self._fixed: dict[str, object] = {}
        self._roles = {role: resolve_role(cfg, role) for role in ROLES if role_setting(cfg, role) != "current"}

    def for_iteration(self, current) -> RoleEngines:
        """Use ``current`` (M_t's GenerationModel) for the roles that are M_t."""
        self.current = current
        return self

    def fixed(self, role: str) -> FixedModel | None:
        return self._roles.get(role)

    def label(self, role: str) -> str:
        """The model ``role`` runs on in this iteration (for the metrics)."""
        fm = self.fixed(role)
        if fm is None or self._is_current(fm):
            return str(self.current.model)
        return fm.label

    def engine(self, role: str):
        """A zero-argument callable returning ``role``'s engine (loaded on first call)."""
        return lambda: self._engine(role)

    def _is_current(self, fm: FixedModel) -> bool:
        cur = self.current
        return cur is not None and fm.engine.kind == self.cfg.engine.kind and fm.engine == self.cfg.engine and \
            Path(fm.model.spec) == Path(cur.model) and fm.model.dtype in ("auto", cur.dtype)

    def _engine(self, role: str):
        fm = self.fixed(role)
        if fm is None or self._is_current(fm):
            if self._exclusive(self.cfg.engine):
                self._close_local()
            return self.current()
        if fm.key not in self._fixed:
            if self._exclusive(fm.engine):
                if self.current is not None:
                    self.current.close()
                self._close_local()
            self.log(f"[{role}] loading the fixed model {fm.label} (never trained)")
            self._fixed[fm.key] = create_engine(fm.model, fm.engine)
        return self._fixed[fm.key]

    @staticmethod
    def _exclusive(engine: EngineConfig) -> bool:
        """Local generation on a GPU: one model at a time."""
        if engine.kind == "vllm":
            return True
        if engine.kind == "hf":
            from selfalign.engines.hf import pick_device

            return str(pick_device(engine.device)).startswith("cuda")
        return False

    def _close_local(self) -> None:
        for key in [k for k in self._fixed if not k.startswith("openai:")]:
            self._fixed.pop(key).close()

    def release(self) -> None:
        """End of an iteration's generation: fixed models on a GPU are closed, so DPO and the
        evaluations get the memory (a CPU keeps them for the next iteration)."""
        for key in [k for k, fm in self._loaded_models() if self._exclusive(fm.engine)]:
            self._fixed.pop(key).close()

    def _loaded_models(self):
        by_key = {fm.key: fm for fm in self._roles.values() if fm is not None}
        return [(k, by_key[k]) for k in self._fixed if k in by_key]

    def close(self) -> None:
        """Close every fixed engine (end of the run)."""
        for key in list(self._fixed):
            self._fixed.pop(key).close()
