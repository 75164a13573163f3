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
    if engine_cfg.kind == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            from selfalign.errors import EngineError

            raise EngineError(
                "engine.kind is 'vllm' but vLLM is not installed in this environment; on a GPU machine: "
                "pip install 'selfalign[vllm]'; on CPU: scripts/setup_vllm.sh, then run .venv-vllm/bin/selfalign"
            )
        from selfalign.engines.vllm import VLLMEngine

        return VLLMEngine.from_config(model_cfg, engine_cfg)
    raise ValueError(f"unknown engine kind {engine_cfg.kind!r}")
