"""Fixtures of the reliability suite, and the crash-resume table printed at the end of a session.

Each crash-resume test adds rows (stage | kill points | records compared) with the
``crash_table`` fixture; the row's result is the test's outcome. The table is printed in the
terminal summary (no ``-s`` needed) whenever a crash-resume test ran.
"""

from __future__ import annotations

import pytest

_ROWS: list[dict] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        item._crash_outcome = rep.outcome


class CrashTable:
    def __init__(self, test: str) -> None:
        self.test = test
        self.rows: list[dict] = []

    def add(self, stage: str, kills: list[str], compared: int, reference: int = 0) -> None:
        """``kills``: one label per kill point; ``compared``: records written before a kill that
        were found unchanged after the resume; ``reference``: records (or files) compared byte
        for byte with an uninterrupted run."""
        row = {"test": self.test, "stage": stage, "kills": list(kills), "compared": compared, "reference": reference,
               "result": "?"}
        self.rows.append(row)
        _ROWS.append(row)


@pytest.fixture()
def crash_table(request):
    table = CrashTable(request.node.name)
    yield table
    result = getattr(request.node, "_crash_outcome", "failed")
    for row in table.rows:
        row["result"] = "pass" if result == "passed" else result


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    from .harness import SEED

    tr = terminalreporter
    tr.write_sep("=", f"crash-resume: SIGKILL points (SELFALIGN_CRASH_SEED={SEED})")
    header = ("stage", "kill points", "records compared (pre-kill / vs uninterrupted)", "result")
    lines = [(r["stage"], f"{len(r['kills'])}: {', '.join(r['kills'])}", f"{r['compared']} / {r['reference']}", r["result"])
             for r in _ROWS]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    tr.write_line(fmt.format(*header))
    tr.write_line("-+-".join("-" * w for w in widths))
    for x in lines:
        tr.write_line(fmt.format(*x))
    total = sum(len(r["kills"]) for r in _ROWS)
    tr.write_line(f"total: {total} kill points, {sum(r['compared'] for r in _ROWS)} pre-kill records compared, "
                  f"{sum(r['reference'] for r in _ROWS)} records/files compared with uninterrupted runs")
