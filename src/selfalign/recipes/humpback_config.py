"""Configuration of the Instruction Backtranslation ("Humpback") recipe: a run file with
``recipe: humpback`` and the sections below (validated; ``--set section.key=value`` overrides)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from selfalign.config import EngineConfig, ModelConfig, StrictModel
from selfalign.data.corpus import CorpusSettings
from selfalign.recipes.config import SeedDataConfig
from selfalign.training.config import LaunchSettings, SFTSettings


class BackwardConfig(StrictModel):
    """The backward model M_yx: SFT of the base model on the seed pairs reversed (output -> instruction)."""

    template: str = Field("backtranslate", description="built-in name or a template file path (variable: output)")
    settings: SFTSettings = Field(default_factory=SFTSettings)


class AugmentConfig(StrictModel):
    """Self-augmentation: M_yx writes one instruction per corpus segment."""

    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(96, ge=8)
    min_words: int = Field(3, ge=1, description="drop shorter instructions")
    max_words: int = Field(150, ge=1, description="drop longer instructions")


class CurateConfig(StrictModel):
    """Self-curation: the current model rates each (instruction, output) pair from 1 to 5."""

    template: str = Field("curate", description="built-in name or a template file path (variables: instruction, response)")
    k: int = Field(5, ge=1, le=5, description="keep pairs rated at least k (the paper keeps 5)")
    judgments: int = Field(1, ge=1, description="ratings per pair, averaged")
    scoring: Literal["sampled", "expected", "direct"] = Field(
        "sampled", description="sampled: the last 'Score:' line; expected: digit probabilities after a forced 'Score: '; "
        "direct: no reasoning, the digit probabilities right after an opened 'Score: '"
    )
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(192, ge=8)


class TaggingConfig(StrictModel):
    """Different system prompts for seed and augmented examples; the seed one is used at inference."""

    enabled: bool = True
    seed_system: str = "Answer in the style of an AI Assistant."
    augmented_system: str = "Answer with knowledge from web search."


class HumpbackConfig(StrictModel):
    recipe: Literal["humpback"] = "humpback"
    name: str = "humpback"
    runs_dir: str = "runs"
    rounds: int = Field(2, ge=1, description="curation rounds: curate with M_{r-1}, train M_r on seed + A(r)")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    seed_data: SeedDataConfig = Field(default_factory=lambda: SeedDataConfig(eft="none"))
    corpus: CorpusSettings = Field(default_factory=lambda: CorpusSettings(source="../shared/data/web_text/ud_english_ewt_web_docs.jsonl"))
    backward: BackwardConfig = Field(default_factory=BackwardConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    tagging: TaggingConfig = Field(default_factory=TaggingConfig)
    sft: SFTSettings = Field(default_factory=SFTSettings, description="training of the forward models M_0 .. M_R (each from the base model)")
    training: LaunchSettings = Field(
        default_factory=LaunchSettings, description="where SFT runs: this process, a child process, or accelerate launch"
    )
