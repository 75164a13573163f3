"""The generation contract every engine implements.

A stage builds :class:`GenerationRequest` objects and hands them to an engine's
``generate``; the engine yields one :class:`RequestResult` per request, in whatever
order its batches finish, so the stage can persist results while the engine is still
working. Engines never write files and never know which stage called them.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete ``params.n`` times.

    Exactly one of ``messages`` (chat, formatted with the model's chat template)
    or ``prompt`` (raw text, sent as is) is set. ``id`` is chosen by the caller
    and comes back unchanged on the result.
    """

    id: str
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"request {self.id!r}: set exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise ValueError(f"request {self.id!r}: messages is empty")

    @classmethod
    def chat(cls, id: str, messages: Iterable[Message | dict], params: SamplingParams | None = None) -> GenerationRequest:
        msgs = tuple(m if isinstance(m, Message) else Message(role=m["role"], content=m["content"]) for m in messages)
        return cls(id=id, messages=msgs, params=params or SamplingParams())


@dataclass(frozen=True)
class Sample:
    """One completion of a request. ``index`` is the sample number in ``[0, n)``."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    error: str | None = None


@dataclass(frozen=True)
class RequestResult:
    request: GenerationRequest
    samples: tuple[Sample, ...]
    prompt_tokens: int
    retries: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)


class Engine(abc.ABC):
    """Text generation behind one interface (``hf``, ``openai``, later ``vllm``)."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestResult]:
        """Yield one result per request as soon as its batch is done (any order)."""

    def next_token_probs(
        self, prompts: Sequence[tuple[Sequence[Message | dict], str]], candidates: Sequence[str]
    ) -> list[list[float]]:
        """For each ``(chat messages, assistant text so far)``, the probability that the assistant's
        next token is each of ``candidates`` (single-token strings such as the digits of a score).

        Used to score a judgment from the model's distribution over score digits instead of a
        sampled (and possibly unparsable) score line. Engines that cannot see token
        probabilities raise :class:`NotImplementedError`.
        """
        raise NotImplementedError(f"the {self.name} engine cannot report next-token probabilities")

    @property
    def reports_token_probs(self) -> bool:
        """Whether :meth:`next_token_probs` works on this engine (it overrides the base method).

        ``hf`` and ``vllm`` do; ``openai`` does not (it asks its server for text only). Callers use
        it to pick a scoring that needs probabilities (forced verdicts, expected scores) only where
        it can run."""
        return type(self).next_token_probs is not Engine.next_token_probs

    def describe(self) -> dict:
        """What identifies this engine's outputs (stored with every record)."""
        return {"engine": self.name}

    def close(self) -> None:
        """Free whatever the engine holds (model weights, sessions, devices)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
