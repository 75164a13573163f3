"""Recipe configuration: the sections a Self-Rewarding run file holds.

A run file is YAML with ``recipe: self_rewarding`` and the sections below; every key is
validated (unknown keys are errors naming the key and the file) and can be overridden with
``--set section.key=value``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Field, model_validator

from selfalign.config import EngineConfig, ModelConfig, StrictModel
from selfalign.training.config import DPOSettings, JudgePairwiseSettings, LaunchSettings, SFTSettings


class SeedDataConfig(StrictModel):
    """Where IFT (instruction -> response) and EFT (judge prompt -> judgment) seed data come from."""

    ift: str = Field("demo", description="'demo' (shipped), a chat-examples JSONL, or an OpenAssistant file (oasst:<path>)")
    eft: str = Field(
        "demo",
        description="'demo' (shipped), a JSONL of {instruction, response, judgment}, 'none', or oasst:<file> "
        "(the base model judges human-ranked replies; kept where its scores agree with the ranks)",
    )
    eft_targets: Literal["agree", "ranks"] = Field(
        "agree",
        description="oasst EFT: 'agree' = the paper's (prompts split train/held-out first; the train replies judged "
        "by eft_judge, kept where the judgments agree with the human ranks, score eft_downsample_score down-sampled); 'ranks' = one-line 'Score: N' targets from the human preferences (preferred reply 4, "
        "the other 1), held out by conversation tree; pair it with judge.scoring: direct and judge.template: judge_brief",
    )
    eft_pairwise: list[str] = Field(
        default_factory=list,
        description="eft_targets ranks: pairwise preference files ({input, output_1, output_2, label}) added to the training pool",
    )
    eft_oasst_pairs: Literal["extremes", "all"] = Field(
        "extremes",
        description="eft_targets ranks: units per OASST turn: its best reply against its worst ('extremes'), "
        "or every two replies of different rank ('all'; a middle reply is then the preferred one of some units and "
        "the other of others, so its target averages out to its place in the ranking)",
    )
    eft_oasst_turns: Literal["first", "all"] = Field(
        "first", description="eft_targets ranks: OASST prompter turns that give units: first turns only, or every turn"
    )
    eft_objective: Literal["sft", "pairwise"] = Field(
        "sft",
        description="how the judge learns from EFT: 'sft' = the paper's (judge prompt -> judgment text in M1's SFT); "
        "'pairwise' (needs eft_targets: ranks) = after SFT on the IFT, a Bradley-Terry loss trains the judge's direct "
        "score of the preferred reply of each unit above the other's (settings: sft.judge_pairwise; "
        "judge with judge.scoring: direct)",
    )
    eft_length_balance: bool = Field(True, description="eft_targets ranks: keep as many 'shorter reply preferred' units as 'longer preferred'")
    eft_pairwise_examples: bool = Field(False, description="eft_targets ranks: also train 'Winner: A|B' pairwise_brief examples (both orders)")
    eft_judge: Literal["ift_sft", "base"] = Field(
        "ift_sft",
        description="eft_targets agree: who writes the judgments: 'ift_sft' = the SFT baseline, the base model "
        "fine-tuned on IFT only with sft.settings (the paper; stage sft_ift), 'base' = the base model as it is",
    )
    eft_downsample_score: int | None = Field(
        4, ge=0, le=5,
        description="eft_targets agree: cut the examples with this score to the count of the most frequent other score "
        "(the paper down-samples its over-represented 4); null keeps every agreeing judgment",
    )
    eft_ties: Literal["drop", "allow"] = Field("drop", description="oasst EFT: do tied scores count as agreement?")
    eft_max_groups: int | None = Field(None, ge=1, description="oasst EFT: judge at most this many (train) prompts")
    eft_max_new_tokens: int = Field(256, ge=16)
    max_ift: int | None = Field(None, ge=1)
    max_eft: int | None = Field(None, ge=1)
    eft_heldout_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="EFT share held out to evaluate the judge")
    oasst_lang: list[str] = Field(default_factory=lambda: ["en"])
    seed: int = 0

    @model_validator(mode="after")
    def _pairwise_needs_units(self) -> SeedDataConfig:
        if self.eft_objective == "pairwise" and self.eft_targets != "ranks":
            raise ValueError("eft_objective 'pairwise' trains on human preference units: it needs eft_targets: ranks "
                             "(and an oasst:<file> eft or eft_pairwise files)")
        return self


class SFTStageConfig(StrictModel):
    """M1 = SFT of the base model on IFT + EFT (skip it when starting from a tuned model); with
    ``seed_data.eft_objective: pairwise``, SFT on the IFT and then pairwise judge training."""

    enabled: bool = True
    use_ift: bool = True
    use_eft: bool = True
    settings: SFTSettings = Field(default_factory=SFTSettings)
    judge_pairwise: JudgePairwiseSettings = Field(
        default_factory=JudgePairwiseSettings,
        description="seed_data.eft_objective pairwise: the Bradley-Terry judge training after SFT (its template is "
        "judge.template's, whatever is set here)",
    )


# ----------------------------------------------------------------------------- the roles' models
ROLE_SHORTHANDS = ("current", "base")


class RoleModelConfig(StrictModel):
    """A fixed model for one role, with its own engine (e.g. an OpenAI-compatible endpoint):
    ``{spec: llama-3-70b-instruct, engine: {kind: openai, base_url: http://host:8000/v1}}``."""

    spec: str = Field(min_length=1, description="model spec: hub id, local dir, .gguf file, smollm2-135m-instruct, or the served name")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    engine: EngineConfig | None = Field(None, description="default: the run's engine section")


ROLE_MODEL_HELP = (
    "who plays this role: 'current' = M_t, the model being trained (changes every iteration); 'base' = the run's "
    "model.spec as loaded, never trained; any other string = a model spec (hub id, local dir, .gguf, "
    "smollm2-135m-instruct) loaded with the run's engine; or {spec, dtype, engine} for a fixed model on its own "
    "engine (e.g. engine: {kind: openai, base_url: ...}). A fixed model is loaded once per run and never trained."
)


def _check_role(v):
    if isinstance(v, str) and not v.strip():
        raise ValueError("empty model; use 'current', 'base', a model spec, or {spec, engine}")
    return v


RoleModel = Annotated[Union[str, RoleModelConfig], AfterValidator(_check_role)]


class SelfInstructConfig(StrictModel):
    model: RoleModel = Field(
        "base",
        description="the prompt writer. " + ROLE_MODEL_HELP + " Default 'base': a fixed writer, as in Self-Rewarding "
        "(the paper used Llama-2-Chat-70B, never M_t)",
    )
    prompts: str | None = Field(
        None,
        description="a fixed prompt pool (JSONL/JSON: strings or {prompt|instruction|messages}) instead of generated "
        "prompts, as in Meta-Rewarding: num_prompts drawn per iteration without replacement (seeded); model unused",
    )
    keyword_filter: bool = Field(True, description="Self-Instruct's filter: drop prompts that mention images, files, plots, audio...")
    keywords: list[str] | None = Field(None, description="the filtered words; default: Self-Instruct's list (stages/self_instruct.py)")
    num_prompts: int = Field(64, ge=1)
    seed_shots: int = Field(6, ge=0)
    generated_shots: int = Field(2, ge=0)
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    temperature: float = Field(0.6, ge=0.0, description="the paper: 0.6 (with top_p 0.9)")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(96, ge=8)
    batch_size: int = Field(64, ge=1)
    max_rounds: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _shots(self) -> SelfInstructConfig:
        if self.seed_shots + self.generated_shots < 1:
            raise ValueError("seed_shots + generated_shots must be at least 1")
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


class RespondConfig(StrictModel):
    model: RoleModel = Field("current", description="the actor. " + ROLE_MODEL_HELP + " Default: M_t (both papers)")
    n: int = Field(4, ge=2, description="candidate responses per prompt")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    system_prompt: str | None = None


class JudgeConfig(StrictModel):
    kind: Literal["llm", "function", "classifier"] = "llm"
    model: RoleModel = Field(
        "current",
        description="the LLM judge. " + ROLE_MODEL_HELP + " Default: M_t, the model judges itself (both papers); a fixed "
        "model here is the 'external judge' ablation (RLAIF-style)",
    )
    k: int = Field(3, ge=1, description="judgments per candidate (LLM judge)")
    scoring: Literal["sampled", "expected", "direct"] = Field(
        "sampled",
        description="sampled: the score on the judgment's last 'Score:' line (the paper); expected: after the "
        "judgment's reasoning, 'Score: ' is forced and the score is the probability-weighted mean of the digits "
        "(never fails to parse, fewer ties; needs an engine that reports token probabilities); direct: no "
        "reasoning, the probability-weighted digit right after 'Score: ' (one judgment per candidate, k unused)",
    )
    template: str = Field("judge", description="built-in template name or a template file path")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(192, ge=8)
    function: str | None = Field(None, description="'module:function' for kind=function")
    classifier_model: str | None = Field(None, description="model dir for kind=classifier")

    @model_validator(mode="after")
    def _kind_fields(self) -> JudgeConfig:
        if self.kind == "function" and not self.function:
            raise ValueError("kind 'function' needs judge.function: 'module:function'")
        if self.kind == "classifier" and not self.classifier_model:
            raise ValueError("kind 'classifier' needs judge.classifier_model")
        return self


class PairsConfig(StrictModel):
    export_perfect: bool = Field(False, description="also write candidates with a perfect score as SFT examples")
    perfect_score: float = 5.0


class JudgeEvalHook(StrictModel):
    """After each iteration: the new model's judging against the held-out EFT split's reference ranking."""

    enabled: bool = False
    k: int = Field(3, ge=1, description="judgments per reply, averaged")
    scoring: Literal["sampled", "expected", "direct"] | None = Field(None, description="default: judge.scoring")
    max_new_tokens: int | None = Field(None, ge=8, description="default: judge.max_new_tokens")


class WinrateHook(StrictModel):
    """After each iteration: M_{t+1} against M_t on held-out prompts, judged in both orders by a fixed judge."""

    enabled: bool = False
    prompts: str = Field("../shared/data/oasst/oasst_prompt_lottery_en_250.jsonl", description="prompt file (JSONL/JSON) not used for training")
    limit: int | None = Field(32, ge=1, description="first N prompts")
    system_prompt: str | None = None
    max_new_tokens: int = Field(256, ge=1, description="response length of both models")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    judge_model: str | None = Field(None, description="model spec of the judge; default: the run's base model (model.spec)")
    template: str = Field("pairwise", description="built-in name or a pairwise template file")
    verdict: Literal["auto", "sampled", "forced"] = Field(
        "auto",
        description="auto: forced where the judge's engine reports token probabilities (hf, vllm), else sampled; "
        "sampled: the judge's last 'Winner:' line; forced: P('A') vs P('B') after 'Winner: '",
    )
    judge_max_new_tokens: int = Field(192, ge=0, description="the judge's reasoning before its verdict (0 only with forced)")
    judge_temperature: float = Field(0.0, ge=0.0)


class IFEvalHook(StrictModel):
    """After each iteration: IFEval (judge-free instruction following) of the model the iteration
    trained, and once of the model iteration 1 starts from; greedy answers on a fixed subset."""

    enabled: bool = False
    input: str = Field("../shared/data/ifeval/input_data.jsonl", description="IFEval prompts (the 541-prompt set)")
    limit: int | None = Field(
        32, ge=1,
        description="prompts per evaluation: a fixed subset, the same for every model (a seeded random 32 of the 541 by "
        "default, sized for CPU); null = all 541",
    )
    sample: bool = Field(True, description="the subset is a seeded random sample (true) or the first N prompts (false)")
    seed: int = Field(0, description="seed of the subset sample and of the bootstrap intervals")
    max_new_tokens: int = Field(256, ge=1, description="most tokens per greedy answer")
    system_prompt: str | None = None


class EvalHooks(StrictModel):
    judge: JudgeEvalHook = Field(default_factory=JudgeEvalHook)
    winrate: WinrateHook = Field(default_factory=WinrateHook)
    ifeval: IFEvalHook = Field(default_factory=IFEvalHook)


class SelfRewardingConfig(StrictModel):
    recipe: Literal["self_rewarding"] = "self_rewarding"
    name: str = "self_rewarding"
    runs_dir: str = "runs"
    iterations: int = Field(2, ge=1)
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    seed_data: SeedDataConfig = Field(default_factory=SeedDataConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    respond: RespondConfig = Field(default_factory=RespondConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    training: LaunchSettings = Field(
        default_factory=LaunchSettings, description="where SFT and DPO run: this process, a child process, or accelerate launch"
    )
    eval: EvalHooks = Field(default_factory=EvalHooks, description="evaluations after each iteration (stored in the run, shown in the report)")


# ----------------------------------------------------------------------------- Meta-Rewarding
class LengthControlConfig(StrictModel):
    rho: float = Field(
        0.2, ge=0.0, le=1.0,
        description="0 = plain best-vs-worst; larger widens the top/bottom tiers and prefers shorter chosen, longer rejected",
    )


class MetaJudgeConfig(StrictModel):
    model: RoleModel = Field("current", description="the meta-judge. " + ROLE_MODEL_HELP + " Default: M_t (the paper)")
    template: str = Field("meta_judge", description="built-in name or a template file path")
    per_prompt: int | None = Field(
        1, ge=1,
        description="responses meta-judged per prompt, highest judgment-score variance first (the paper: 1, the response "
        "whose judgments disagree most); null = every response whose judgments differ",
    )
    top_k: int | None = Field(None, ge=1, description="responses meta-judged per iteration (highest judgment-score variance first)")
    min_variance: float | None = Field(None, ge=0.0, description="only responses whose judgment scores vary at least this much")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=8)
    verdict: Literal["sampled", "forced"] = Field(
        "sampled",
        description="sampled: the output's last 'Winner:' line (the paper); forced: after the reasoning, "
        "'Winner: ' is forced and the more probable of A and B wins (never fails to parse; hf engine)",
    )
    elo_l2: float = Field(0.01, ge=0.0, description="L2 regulariser of the Elo fit (keeps it finite when one judgment wins all)")
    max_judgment_chars: int | None = Field(None, ge=1, description="drop judge pairs with a longer judgment")
    max_judgment_tokens: int | None = Field(None, ge=1, description="drop judge pairs with a longer judgment (actor tokens)")


Schedule = Literal["actor+judge", "actor"]


class MetaRewardingConfig(SelfRewardingConfig):
    recipe: Literal["meta_rewarding"] = "meta_rewarding"  # type: ignore[assignment]
    name: str = "meta_rewarding"
    iterations: int = Field(4, ge=1)
    sft: SFTStageConfig = Field(default_factory=lambda: SFTStageConfig(use_ift=False))
    respond: RespondConfig = Field(default_factory=lambda: RespondConfig(n=7))
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(k=5))
    length_control: LengthControlConfig = Field(default_factory=LengthControlConfig)
    meta_judge: MetaJudgeConfig = Field(default_factory=MetaJudgeConfig)
    schedule: list[Schedule] = Field(
        default_factory=lambda: ["actor+judge", "actor+judge", "actor", "actor"],
        min_length=1,
        description="what DPO trains on in iteration t (the last entry repeats): actor and judge pairs, or actor pairs only",
    )

    def plan(self, t: int) -> Schedule:
        return self.schedule[min(t, len(self.schedule)) - 1]

