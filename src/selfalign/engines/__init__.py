"""Generation engines behind one interface (see :mod:`selfalign.engines.base`)."""

from __future__ import annotations

from selfalign.engines.base import Engine, GenerationRequest, Message, RequestResult, Sample, SamplingParams

__all__ = ["Engine", "GenerationRequest", "Message", "RequestResult", "Sample", "SamplingParams", "create_engine"]


def create_engine(model_cfg, engine_cfg) -> Engine:
    """Build the engine named by ``engine_cfg.kind`` (imports only what that engine needs)."""
    if engine_cfg.kind == "hf":
        from selfalign.engines.hf import HFEngine

        return HFEngine.from_config(model_cfg, engine_cfg)
    if engine_cfg.kind == "openai":
        from selfalign.engines.openai import OpenAIEngine

        return OpenAIEngine.from_config(model_cfg, engine_cfg)
    raise ValueError(f"unknown engine kind {engine_cfg.kind!r}")
