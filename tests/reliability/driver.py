"""Crash-resume driver: runs one recipe stage (and the stages it needs first) in its own process.

    python tests/reliability/driver.py SCENARIO RUN_DIR [--model DIR] [--corpus FILE] [--hook JSON]

The crash-resume tests start this script with ``subprocess.Popen``, let it run to a chosen
point and SIGKILL it; then they finish the same scenario (in-process, via :func:`run_scenario`)
and compare what is on disk. Every scenario calls the functions the recipes call
(``selfalign.recipes.steps`` / ``self_rewarding`` / ``meta_rewarding`` / ``humpback``), on a
run directory opened with :class:`selfalign.run.Run`, so the manifest and the ``.done``
markers are the real ones. Generation uses the scripted engine (tests/scripted.py) with
deterministic replies per role, or the embedded model for the ``real_*`` scenarios; training
uses the tiny random model or the embedded model.

``--hook`` arms one stopping point (JSON, see :func:`install_hook`). At that point the child
writes ``hook["marker"]`` (JSON describing what it left on disk) and then sleeps until it is
killed, so a kill lands exactly there: part-way through a JSONL batch (``torn``), after the
batch's ``write`` but before its fsync (``unsynced``), between two complete fsynced batches
(``between``), after a ``.done`` marker but before the manifest records the stage done
(``done_marker``), after or in the middle of a training checkpoint (``checkpoint_saved``,
``checkpoint_partial``), inside the final model save (``final_save``), half-way through the
run's manifest (``manifest_write``) or half-way through a report file (``report_write``).
``{"kind": "slow", "delay": s}`` only slows the scripted engine down so the parent can kill at
a number of records on disk. The hooks are monkeypatches made
here, in the child; production modules carry no test-only code.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from scripted import ScriptedEngine

from selfalign.data.records import atomic_write_json

# --------------------------------------------------------------------------- scripted replies
# Deterministic per (request id, sample index): a rerun asks for the same records and gets
# the same text, so a resumed stage can be compared byte for byte with an uninterrupted one.
# Texts mix in non-ASCII so that a torn write can cut through a multi-byte character.

_VERBS = ["Explain", "Describe", "Summarise", "Compare", "List the steps of", "Give three facts about",
          "Write a short poem about", "Outline the history of", "Suggest ways to learn", "Argue for and against"]
_TOPICS = ["crème brûlée at home", "Zürich's tram network", "naïve Bayes classifiers", "the water cycle",
           "日本の桜 in spring", "compound interest", "tidal locking of moons", "sourdough starters",
           "the Doppler effect", "café culture in Lisbon", "binary search trees", "photosynthesis in algae",
           "the Treaty of Westphalia", "Ω-notation in algorithms", "urban beekeeping", "solar sails"]
_AUDIENCE = ["for a curious child", "in plain words", "for a first-year student", "with one worked example",
             "in under a hundred words", "for a busy manager"]


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).digest()[:8], "big")


def reply_self_instruct(req, i: int) -> str:
    h = _h("si", req.id, i)
    if h % 11 == 0:
        return ""  # nothing usable: parse_failed
    if h % 13 == 0:
        return "Why?"  # too_short
    return f"{_VERBS[h % len(_VERBS)]} {_TOPICS[(h // 10) % len(_TOPICS)]} {_AUDIENCE[(h // 160) % len(_AUDIENCE)]}."


def reply_respond(req, i: int) -> str:
    h = _h("respond", req.id, i)
    words = ("Here is a careful answer — étape par étape, with ✓ checks and a naïve example. " * (1 + h % 5)).strip()
    return f"[{i}] {words} Final note {h % 997}."


def reply_judge(req, i: int) -> str:
    h = _h("judge", req.id, i)
    if h % 9 == 0:
        return "The answer is hard to rate; I will not give a number."  # parse failure
    return f"The response is relevant and addresses part of the question (check {h % 89}).\nScore: {h % 6}"


def reply_meta(req, i: int) -> str:
    h = _h("meta", req.id, i)
    if h % 10 == 0:
        return "Both judgments have merit."  # parse failure
    return f"Judgment {'A' if h % 3 else 'B'} follows the rubric more closely.\nWinner: {'A' if h % 3 else 'B'}"


def reply_backtranslate(req, i: int) -> str:
    h = _h("bt", req.id, i)
    if h % 7 == 0:
        return "Text."  # too_short
    return f"Instruction: {_VERBS[h % len(_VERBS)]} {_TOPICS[(h // 10) % len(_TOPICS)]} {_AUDIENCE[(h // 160) % len(_AUDIENCE)]}"


def reply_curate(req, i: int) -> str:
    h = _h("curate", req.id, i)
    if h % 8 == 0:
        return "Not sure how to rate this pair."
    return f"The answer is on topic and mostly complete ({h % 53}).\nScore: {1 + h % 5}"


ROLES = {"self_instruct": reply_self_instruct, "respond": reply_respond, "judge": reply_judge, "meta": reply_meta,
         "backtranslate": reply_backtranslate, "curate": reply_curate}
_DELAY = 0.0  # seconds per request (the "slow" hook), so a parent can kill between records


def scripted(role: str):
    """An engine *factory* (what the recipe steps take): returns the scripted engine of ``role``."""
    reply = ROLES[role]

    def slow_reply(req, i):
        if _DELAY and i == 0:
            time.sleep(_DELAY)
        return reply(req, i)

    engine = ScriptedEngine(slow_reply)
    return lambda: engine


# --------------------------------------------------------------------------- configs


def _runs(run_dir: Path) -> dict:
    return {"runs_dir": str(run_dir.parent), "name": run_dir.name}


def self_rewarding_config(run_dir: Path, cls=None, **extra):
    from selfalign.recipes.config import SelfRewardingConfig

    cls = cls or SelfRewardingConfig
    data = {
        **_runs(run_dir), "iterations": 1, "seed": 7,
        "seed_data": {"max_ift": 24, "max_eft": 4},
        "sft": {"enabled": False},
        "self_instruct": {"num_prompts": 12, "batch_size": 6, "max_rounds": 12},
        "respond": {"n": 4, "max_new_tokens": 48},
        "judge": {"k": 3, "max_new_tokens": 64},
        "dpo": {"max_steps": 4, "save_steps": 2, "per_device_batch_size": 2, "max_length": 192,
                "learning_rate": 5e-4, "logging_steps": 1},
    }
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return cls.model_validate(data)


def meta_rewarding_config(run_dir: Path):
    from selfalign.recipes.config import MetaRewardingConfig

    return self_rewarding_config(
        run_dir, MetaRewardingConfig,
        respond={"n": 4}, judge={"k": 4}, length_control={"rho": 0.3},
        meta_judge={"max_new_tokens": 64, "top_k": 12}, schedule=["actor+judge"],
    )


def humpback_config(run_dir: Path, corpus: str):
    from selfalign.recipes.humpback_config import HumpbackConfig

    return HumpbackConfig.model_validate({
        **_runs(run_dir), "rounds": 1, "seed": 5,
        "seed_data": {"max_ift": 8},
        "corpus": {"source": corpus, "max_segments": 40, "min_words": 20, "max_words": 200},
        "augment": {"max_new_tokens": 48},
        "curate": {"k": 4, "judgments": 2, "max_new_tokens": 48},
    })


_LOG_SINK: list = []  # in-process runs collect the log lines here (see run_scenario)


def _log(msg: str) -> None:
    for sink in _LOG_SINK:
        sink(msg)
    print(msg, flush=True)


# --------------------------------------------------------------------------- scenarios


def self_rewarding_iteration(run_dir: Path, cfg=None, *, until: str = "pairs", model: Path | None = None,
                             engines: dict | None = None) -> dict:
    """Iteration 1 of Self-Rewarding with the recipe's steps: self_instruct, respond, judge, pairs,
    the iteration metrics, and (``until="dpo"``) DPO of ``model``."""
    from selfalign.data.seeding import load_seed_data
    from selfalign.recipes import self_rewarding as sr
    from selfalign.recipes.steps import (
        SEED_KEYS,
        judge_step,
        respond_step,
        self_instruct_step,
    )
    from selfalign.run import Run

    cfg = cfg or self_rewarding_config(run_dir)
    engines = engines or {}
    run = Run.open(run_dir, cfg.model_dump(mode="json"))
    seed = load_seed_data(cfg.seed_data)
    t, it, keys = 1, "iter_1", SEED_KEYS + sr.ITER_KEYS
    stage = {n: run.stage(f"{it}/{n}", depends_on=keys) for n in ("self_instruct", "respond", "judge", "pairs")}
    if until == "dpo":
        stage["dpo"] = run.stage(f"{it}/dpo", depends_on=keys, outputs=[f"{it}/model"])
    prompts = self_instruct_step(stage["self_instruct"], cfg, t, engines.get("self_instruct") or scripted("self_instruct"), seed, False)
    responses = respond_step(stage["respond"], cfg, t, engines.get("respond") or scripted("respond"), prompts, False)
    judge_step(stage["judge"], cfg, t, scripted("judge"), responses, False)
    pairs = sr.pairs_step(stage["pairs"], run, cfg, t, responses)
    atomic_write_json(run.root / it / "metrics.json", sr.iteration_metrics(run, t, responses, pairs))
    out = {"prompts": len(prompts), "responses": len(responses), "pairs": len(pairs)}
    if until == "dpo":
        _dpo_step(stage["dpo"], cfg, model, pairs, run.root / it / "model", cfg.dpo, it)
    return out


def _dpo_step(stage, cfg, model, pairs, out, settings, label) -> None:
    from selfalign.recipes.steps import dpo_step

    dpo_step(stage, cfg, model, pairs, out, settings, _log, label)


def meta_rewarding_iteration(run_dir: Path) -> dict:
    """Iteration 1 of Meta-Rewarding with the recipe's steps (no DPO): self_instruct, respond,
    judge, meta_judge + judge_pairs (Elo), length-controlled actor_pairs, the iteration metrics."""
    from selfalign.data.seeding import load_seed_data
    from selfalign.recipes import meta_rewarding as mr
    from selfalign.recipes.steps import (
        SEED_KEYS,
        judge_step,
        respond_step,
        self_instruct_step,
    )
    from selfalign.run import Run

    cfg = meta_rewarding_config(run_dir)
    run = Run.open(run_dir, cfg.model_dump(mode="json"))
    seed = load_seed_data(cfg.seed_data)
    t, it, keys = 1, "iter_1", SEED_KEYS + mr.ITER_KEYS
    names = ["self_instruct", "respond", "judge", "actor_pairs", "meta_judge", "judge_pairs"]
    stage = {n: run.stage(f"{it}/{n}", depends_on=keys) for n in names}
    prompts = self_instruct_step(stage["self_instruct"], cfg, t, scripted("self_instruct"), seed, False)
    responses = respond_step(stage["respond"], cfg, t, scripted("respond"), prompts, False)
    judge_step(stage["judge"], cfg, t, scripted("judge"), responses, False)
    judge_pairs = mr.meta_judge_step(stage["meta_judge"], stage["judge_pairs"], cfg, t, scripted("meta"), responses, False)
    actor_pairs = mr.actor_pairs_step(stage["actor_pairs"], run, cfg, t, responses)
    atomic_write_json(run.root / it / "metrics.json", mr.iteration_metrics(run, cfg, t, responses, actor_pairs, judge_pairs))
    return {"responses": len(responses), "judge_pairs": len(judge_pairs), "actor_pairs": len(actor_pairs)}


class _ScriptedGenerationModel:
    """Stands in for ``recipes.steps.GenerationModel`` in the Humpback steps: the backward model
    (label ``augment``) writes instructions, the forward model rates pairs."""

    dtype, changed = "scripted", None

    def __init__(self, cfg, model, parent, label, log) -> None:
        self._engine = scripted("backtranslate" if label == "augment" else "curate")()

    def __call__(self):
        return self._engine

    def close(self) -> None:
        pass


def humpback_round(run_dir: Path, corpus: str) -> dict:
    """Humpback with the recipe's steps, scripted models: corpus, self-augmentation, round-1
    self-curation (ratings + the k filter) and the round metrics (no SFT)."""
    from selfalign.data.seeding import load_seed_data
    from selfalign.recipes import humpback as hb
    from selfalign.run import Run

    cfg = humpback_config(run_dir, corpus)
    run = Run.open(run_dir, cfg.model_dump(mode="json"))
    seed = load_seed_data(cfg.seed_data).ift
    with mock.patch.object(hb, "GenerationModel", _ScriptedGenerationModel):
        segments = hb.corpus_step(run, cfg, _log)
        augmented = hb.augment_step(run, cfg, Path("backward/model"), Path("base"), segments, _log, False)
        curated = hb.curate_step(run, cfg, 1, Path("sft/model"), Path("base"), augmented, _log, False)
    atomic_write_json(run.root / "iter_1" / "metrics.json", hb.round_metrics(run, cfg, 1, augmented, len(seed), len(curated)))
    return {"segments": len(segments), "augmented": len(augmented), "curated": len(curated)}


def seed_sft(run_dir: Path, model: Path) -> dict:
    """M1 = SFT(M0, IFT + EFT) with ``recipes.steps.sft_step`` (the tiny model as M0)."""
    from selfalign.data.seeding import load_seed_data
    from selfalign.recipes.steps import sft_step
    from selfalign.run import Run

    cfg = self_rewarding_config(run_dir, sft={"enabled": True, "settings": {
        "max_steps": 6, "save_steps": 2, "per_device_batch_size": 2, "max_length": 384, "learning_rate": 1e-3,
        "logging_steps": 1}})
    run = Run.open(run_dir, cfg.model_dump(mode="json"))
    out = sft_step(run, cfg, model, load_seed_data(cfg.seed_data), _log)
    return {"model": str(out)}


def report(run_dir: Path) -> dict:
    """``selfalign report``'s writer on a Self-Rewarding run (built first when absent)."""
    from selfalign.report.html import write_report

    self_rewarding_iteration(run_dir)
    return {"index": str(write_report(run_dir))}


def real_respond(run_dir: Path, model: Path) -> dict:
    """Respond with the embedded model (hf engine, a few seed prompts, few tokens)."""
    from selfalign.config import ModelConfig
    from selfalign.data.prompt_sets import Prompt
    from selfalign.data.seeding import load_seed_data
    from selfalign.engines import create_engine
    from selfalign.recipes import self_rewarding as sr
    from selfalign.recipes.steps import SEED_KEYS, respond_step
    from selfalign.run import Run

    cfg = self_rewarding_config(run_dir, respond={"n": 3, "max_new_tokens": 12}, engine={"max_batch_size": 4})
    run = Run.open(run_dir, cfg.model_dump(mode="json"))
    seed = load_seed_data(cfg.seed_data)
    prompts = [Prompt(id=r["id"], messages=(r["messages"][0],), source="seed") for r in seed.ift[:6]]
    stage = run.stage("iter_1/respond", depends_on=SEED_KEYS + sr.ITER_KEYS)
    holder: dict = {}

    def engine():
        if "e" not in holder:
            holder["e"] = create_engine(ModelConfig(spec=str(model), dtype=cfg.model.dtype), cfg.engine)
        return holder["e"]

    try:
        responses = respond_step(stage, cfg, 1, engine, prompts, False)
    finally:
        if "e" in holder:
            holder["e"].close()
    return {"responses": len(responses)}


def real_dpo(run_dir: Path, model: Path) -> dict:
    """DPO (LoRA) of the embedded model on seed-derived pairs with ``recipes.steps.dpo_step``."""
    from selfalign.data.seeding import load_seed_data
    from selfalign.recipes import self_rewarding as sr
    from selfalign.recipes.steps import SEED_KEYS
    from selfalign.run import Run

    cfg = self_rewarding_config(run_dir, dpo={
        "max_steps": 3, "save_steps": 1, "per_device_batch_size": 1, "max_length": 128, "learning_rate": 1e-4,
        "lora": {"r": 8, "alpha": 16}, "logging_steps": 1})
    run = Run.open(run_dir, cfg.model_dump(mode="json"))
    seed = load_seed_data(cfg.seed_data)
    pairs = []
    for a, b in zip(seed.ift[:4], seed.ift[4:8]):  # chosen: the seed answer; rejected: another prompt's
        pairs.append({"prompt": [a["messages"][0]],
                      "chosen": [{"role": "assistant", "content": " ".join(a["messages"][1]["content"].split()[:24])}],
                      "rejected": [{"role": "assistant", "content": " ".join(b["messages"][1]["content"].split()[:12])}]})
    stage = run.stage("iter_1/dpo", depends_on=SEED_KEYS + sr.ITER_KEYS, outputs=["iter_1/model"])
    _dpo_step(stage, cfg, model, pairs, run.root / "iter_1" / "model", cfg.dpo, "iter_1")
    return {"pairs": len(pairs)}


SCENARIOS = {
    "self_rewarding": lambda run_dir, model, corpus: self_rewarding_iteration(run_dir),
    "self_rewarding_dpo": lambda run_dir, model, corpus: self_rewarding_iteration(run_dir, until="dpo", model=model),
    "meta_rewarding": lambda run_dir, model, corpus: meta_rewarding_iteration(run_dir),
    "humpback": lambda run_dir, model, corpus: humpback_round(run_dir, corpus),
    "sft": lambda run_dir, model, corpus: seed_sft(run_dir, model),
    "report": lambda run_dir, model, corpus: report(run_dir),
    "real_respond": lambda run_dir, model, corpus: real_respond(run_dir, model),
    "real_dpo": lambda run_dir, model, corpus: real_dpo(run_dir, model),
}


def run_scenario(name: str, run_dir: Path, *, model: Path | None = None, corpus: str | None = None, log=None) -> dict:
    """Run (or resume, or finish) scenario ``name`` in ``run_dir``; ``log`` gets the recipe's log lines."""
    if log is not None:
        _LOG_SINK.append(log)
    try:
        return SCENARIOS[name](Path(run_dir), model, corpus)
    finally:
        if log is not None:
            _LOG_SINK.remove(log)


# --------------------------------------------------------------------------- hooks (child only)


def _stop(marker: Path, info: dict) -> None:
    """Tell the parent where we are (atomically), then wait to be killed."""
    atomic_write_json(marker, {**info, "pid": os.getpid()})
    while True:
        time.sleep(3600)


class _ArmedFile:
    """Wraps the append handle a JsonlWriter opens on the target file; stops at the armed write
    (the writer appends each batch with one ``write`` call, then ``flush`` and fsync)."""

    def __init__(self, f, hook: dict, state: dict) -> None:
        self._f, self._hook, self._state = f, hook, state
        self._info: dict | None = None

    def write(self, data: bytes) -> int:
        self._state["writes"] += 1
        if self._state["writes"] != self._hook["write"]:
            return self._f.write(data)
        kind, marker = self._hook["kind"], Path(self._hook["marker"])
        info = {"kind": kind, "size_before": os.fstat(self._f.fileno()).st_size, "batch": len(data),
                "lines_in_batch": data.count(b"\n")}
        if kind == "between":  # the batches before this one are complete and fsynced
            _stop(marker, {**info, "written": 0})
        if kind == "torn":  # part of the batch reached the file: its last line is incomplete
            cut = _cut_inside_a_line(data, self._hook["cut"])
            self._f.write(data[:cut])
            self._f.flush()
            os.fsync(self._f.fileno())
            _stop(marker, {**info, "written": cut})
        n = self._f.write(data)  # "unsynced": the whole batch is written, fsync comes next
        self._info = {**info, "written": len(data)}
        return n

    def flush(self) -> None:
        self._f.flush()
        if self._info is not None:
            _stop(Path(self._hook["marker"]), self._info)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _cut_inside_a_line(data: bytes, frac: float) -> int:
    """A byte offset in ``data`` that is not at a line end: the next line is left incomplete."""
    cut = max(1, min(len(data) - 1, int(len(data) * frac)))
    if data[cut - 1 : cut] == b"\n":  # at a line boundary: cut into the next line instead
        cut += 1
    if data[cut : cut + 1] == b"\n":  # only the newline would be missing: leave out the last character too
        cut -= 1
    return cut


def install_hook(hook: dict, stack: ExitStack) -> None:
    """Arm the stopping point ``hook`` (see module doc) for the rest of this process."""
    global _DELAY
    kind = hook["kind"]
    if kind == "slow":
        _DELAY = float(hook["delay"])
        return
    marker = Path(hook["marker"])
    if kind in ("torn", "unsynced", "between"):
        from selfalign.data import records

        target, state = Path(hook["file"]).resolve(), {"writes": 0}
        real_open = builtins.open

        def armed_open(path, mode="r", *a, **kw):
            f = real_open(path, mode, *a, **kw)
            if "a" in mode and Path(path).resolve() == target:
                return _ArmedFile(f, hook, state)
            return f

        stack.enter_context(mock.patch.object(records, "open", armed_open, create=True))
        return
    if kind == "done_marker":
        import selfalign.run as run_mod

        real_mark = run_mod.mark_done
        target = Path(hook["file"]).resolve()

        def mark_done(path, extra=None):
            out = real_mark(path, extra)
            if Path(path).resolve() == target:
                _stop(marker, {"kind": kind})
            return out

        stack.enter_context(mock.patch.object(run_mod, "mark_done", mark_done))
        return
    if kind in ("checkpoint_saved", "checkpoint_partial"):
        from transformers import Trainer

        step = int(hook["step"])
        if kind == "checkpoint_saved":
            real = Trainer._save_checkpoint

            def save_checkpoint(self, *a, **kw):
                real(self, *a, **kw)
                if self.state.global_step == step:
                    _stop(marker, {"kind": kind, "step": step})

            stack.enter_context(mock.patch.object(Trainer, "_save_checkpoint", save_checkpoint))
        else:  # model and optimizer written, trainer_state.json (written last) not yet
            real = Trainer._save_rng_state

            def save_rng_state(self, output_dir, *a, **kw):
                real(self, output_dir, *a, **kw)
                if self.state.global_step == step:
                    _stop(marker, {"kind": kind, "step": step, "dir": str(output_dir)})

            stack.enter_context(mock.patch.object(Trainer, "_save_rng_state", save_rng_state))
        return
    if kind == "final_save":
        from selfalign.training import outputs

        real_sync = outputs._fsync_files

        def fsync_files(directory):
            real_sync(directory)  # the finished model is complete in its temporary directory ...
            _stop(marker, {"kind": kind, "tmp": str(directory)})  # ... but neither marked nor renamed

        stack.enter_context(mock.patch.object(outputs, "_fsync_files", fsync_files))
        return
    if kind == "manifest_write":
        import tempfile

        from selfalign import run as run_mod

        real_json, saves = run_mod.atomic_write_json, {"n": 0}

        def atomic_write_json(path, obj):
            path = Path(path)
            if path.name == "manifest.json":
                saves["n"] += 1
                if saves["n"] == hook["write"]:  # half of the new manifest is in its temporary file
                    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
                    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(text[: len(text) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    _stop(marker, {"kind": kind, "tmp": tmp, "save": saves["n"]})
            return real_json(path, obj)

        stack.enter_context(mock.patch.object(run_mod, "atomic_write_json", atomic_write_json))
        return
    if kind == "report_write":
        import tempfile

        import selfalign.report.html as report_mod

        real_write, calls = report_mod._atomic_write_bytes, {"n": 0}

        def atomic_write_bytes(path, payload):
            calls["n"] += 1
            if calls["n"] != hook["write"]:
                return real_write(path, payload)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:  # what the real writer has done when it is killed mid-write
                f.write(payload[: len(payload) // 2])
                f.flush()
                os.fsync(f.fileno())
            _stop(marker, {"kind": kind, "file": path.name, "tmp": tmp})

        stack.enter_context(mock.patch.object(report_mod, "_atomic_write_bytes", atomic_write_bytes))
        return
    raise ValueError(f"unknown hook kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--hook", default=None, help="JSON stopping point (see install_hook)")
    args = ap.parse_args(argv)
    with ExitStack() as stack:
        if args.hook:
            install_hook(json.loads(args.hook), stack)
        out = run_scenario(args.scenario, args.run_dir, model=args.model, corpus=args.corpus)
    print(json.dumps({"finished": args.scenario, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
