"""``selfalign generate`` (responses for a prompt file, any engine) and ``selfalign smoke`` (a quick look at the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from selfalign.cli.shared import SetOption, console, fail, with_sets
from selfalign.errors import SelfAlignError

SMOKE_PROMPTS = [
    "Give me three tips for keeping a houseplant alive.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a rainy Monday morning.",
    "What is the difference between a list and a tuple in Python?",
]


def generate(
    prompts: Annotated[Path, typer.Argument(help="Prompt file: JSONL (strings, or objects with prompt/instruction/messages/turns) or a .json list.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Responses JSONL to write (resumed if it exists).")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model/engine/generation sections.")] = None,
    overrides: SetOption = None,
    engine: Annotated[Optional[str], typer.Option(help="Engine kind: hf, openai or vllm.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model spec: local dir, .gguf file, hub id or smollm2-135m-instruct.")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="Base URL of an OpenAI-compatible server (engine openai).")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Samples per prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Most tokens generated per sample.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed and settings, same text).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate responses for a prompt file with any engine; resumable (rerun to continue)."""
    from selfalign.config import GenerateConfig, load_config
    from selfalign.data.prompt_sets import load_prompts
    from selfalign.engines import create_engine
    from selfalign.stages.generate import run_generate

    sets = with_sets(overrides, (
        ("engine.kind", engine),
        ("model.spec", model),
        ("engine.base_url", base_url),
        ("generation.n", n),
        ("generation.temperature", temperature),
        ("generation.top_p", top_p),
        ("generation.max_new_tokens", max_new_tokens),
        ("generation.seed", seed),
    ))
    try:
        cfg = load_config(GenerateConfig, config, sets)
        prompt_set = load_prompts(prompts, system=cfg.generation.system_prompt, limit=limit)
        with create_engine(cfg.model, cfg.engine) as eng:
            res = run_generate(eng, prompt_set, out, cfg.generation, show_progress=progress)
    except SelfAlignError as e:
        fail(e)
    if res.already_done:
        console.print(f"{out}: already complete ({res.responses} responses); nothing to do")
        return
    dup = f" ({prompt_set.duplicates} repeated prompts skipped)" if prompt_set.duplicates else ""
    console.print(
        f"wrote {res.written_now} responses ({res.skipped_existing} already there) for {res.prompts} prompts{dup} "
        f"to {out}: {res.completion_tokens} tokens in {res.seconds:.1f}s = {res.tokens_per_second:.1f} tok/s"
        + (f"; {res.errors} failed, listed with their reasons in {res.failed_path} (rerun to retry only them)" if res.errors else "")
    )


def smoke(
    model: Annotated[str, typer.Option(help="Model spec.")] = "smollm2-135m-instruct",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 96,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Generation smoke run: a few prompts through the (embedded) model, answers printed."""
    import time

    from selfalign.config import EngineConfig, ModelConfig
    from selfalign.engines import GenerationRequest, SamplingParams, create_engine

    params = SamplingParams(n=1, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens, seed=seed)
    reqs = [GenerationRequest.chat(f"smoke-{i}", [{"role": "user", "content": p}], params) for i, p in enumerate(SMOKE_PROMPTS)]
    try:
        with console.status(f"loading {model} (the first run converts the embedded GGUF once)"):
            eng = create_engine(ModelConfig(spec=model), EngineConfig())
        t0 = time.monotonic()
        results = sorted(eng.generate(reqs), key=lambda r: r.request.id)
        dt = time.monotonic() - t0
    except SelfAlignError as e:
        fail(e)
    tokens = 0
    for r in results:
        s = r.samples[0]
        tokens += s.completion_tokens
        console.rule(f"[bold]{r.request.messages[-1].content}")
        console.print(s.text.strip(), highlight=False, markup=False)
    console.rule()
    console.print(f"{len(results)} answers, {tokens} tokens in {dt:.1f}s ({tokens / dt:.0f} tok/s) with {eng.describe()}")
