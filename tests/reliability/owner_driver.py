"""Run-ownership driver: the real ``selfalign run`` command line, held still at chosen points.

    python tests/reliability/owner_driver.py [--pause sft,judge,dpo] [--signals DIR] -- RUN ARGS...

It runs ``selfalign.cli.app(["run", *RUN ARGS])`` in this process, with two monkeypatches made
here (production modules carry no test-only code):

- generation goes to the scripted engine of :mod:`driver` (deterministic replies per role, the
  role told apart by the prompt: the self-instruct few-shot list, the judge rubric, or a user
  request), so the run needs no real model for text, only the tiny random model for training;
- each ``--pause`` point, when first reached, writes ``DIR/<point>.reached`` (JSON: this pid and
  the stage statuses of the manifest) and waits until ``DIR/<point>.go`` exists. Points:
  ``sft`` / ``dpo``: right after the first training checkpoint of the SFT / DPO trainer is saved;
  ``judge``: at the second judge request (the stage is running, its output file open).

The owner tests (test_run_owner.py) start a second ``selfalign run`` while this one waits, then
let it go on, or SIGKILL it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from driver import reply_judge, reply_respond, reply_self_instruct  # noqa: E402
from scripted import ScriptedEngine  # noqa: E402

_SIGNALS: Path | None = None
_PAUSES: set[str] = set()
_SEEN: dict[str, int] = {}


def pause(point: str) -> None:
    """Stop at ``point`` once (if armed): say so, then wait for the go file."""
    if point not in _PAUSES or _SIGNALS is None:
        return
    _PAUSES.discard(point)
    run_dir = Path(os.environ["OWNER_RUN_DIR"])
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    info = {"pid": os.getpid(), "point": point, "stages": {k: v["status"] for k, v in stages.items()}}
    tmp = _SIGNALS / f".{point}.reached.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(_SIGNALS / f"{point}.reached")
    deadline = time.monotonic() + 600
    while not (_SIGNALS / f"{point}.go").exists():
        if time.monotonic() > deadline:
            print(f"owner_driver: nobody said go at {point}", file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(0.05)


def reply(req, i: int) -> str:
    text = req.messages[-1].content if req.messages else (req.prompt or "")
    if "Score:" in text:
        _SEEN["judge"] = _SEEN.get("judge", 0) + (i == 0)
        if _SEEN["judge"] == 2 and i == 0:
            pause("judge")
        return reply_judge(req, i)
    if re.search(r"Task \d+:\s*$", text):
        return reply_self_instruct(req, i)
    return reply_respond(req, i)


def scripted_engine(*args, **kwargs):
    return ScriptedEngine(reply)


def install(stack) -> None:
    from transformers import Trainer

    from selfalign.recipes import steps

    stack.enter_context(mock.patch.object(steps, "create_engine", scripted_engine))
    real = Trainer._save_checkpoint

    def save_checkpoint(self, *a, **kw):
        real(self, *a, **kw)
        if self.state.global_step == 1:
            names = {c.__name__ for c in type(self).__mro__}
            pause("dpo" if "DPOTrainer" in names else "sft")

    stack.enter_context(mock.patch.object(Trainer, "_save_checkpoint", save_checkpoint))


def main(argv: list[str]) -> int:
    global _SIGNALS
    from contextlib import ExitStack

    ap = argparse.ArgumentParser()
    ap.add_argument("--pause", default="")
    ap.add_argument("--signals", type=Path, default=None)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    _PAUSES.update(p for p in args.pause.split(",") if p)
    _SIGNALS = args.signals
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.argv = ["selfalign", "run", *rest]  # what the lock file records as the owner's command
    from selfalign.cli import app

    with ExitStack() as stack:
        install(stack)
        app(["run", *rest], prog_name="selfalign")  # exits with the command's status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
