"""A scripted engine for stage tests: each sample's text comes from a Python function."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from selfalign.engines.base import Engine, GenerationRequest, RequestResult, Sample


class ScriptedEngine(Engine):
    """``reply(request, sample_index) -> str``; records every request it was given."""

    name = "scripted"

    def __init__(self, reply: Callable[[GenerationRequest, int], str]) -> None:
        self.reply = reply
        self.requests: list[GenerationRequest] = []

    def describe(self) -> dict:
        return {"engine": "scripted"}

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestResult]:
        for req in requests:
            self.requests.append(req)
            samples = tuple(
                Sample(i, t, "stop", len(t.split())) for i, t in ((i, self.reply(req, i)) for i in range(req.params.n))
            )
            yield RequestResult(req, samples, prompt_tokens=10)
