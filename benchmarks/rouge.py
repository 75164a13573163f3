"""ROUGE-L near-duplicate filter: selfalign's RougeFilter against the rouge-score package, in one run.

Task (Self-Instruct's rule, as the self_instruct stage applies it): 2,000 candidate prompts are
offered one by one to a pool of 5,000; a candidate is kept iff its ROUGE-L F-measure against
every prompt in the pool is below 0.7, and a kept candidate joins the pool (so later
candidates are checked against it too).

Rows:

* ``rouge_score`` (the baseline): the rouge-score package the way Self-Instruct's own code uses
  it: every pool prompt tokenized once with ``RougeScorer(["rougeL"], use_stemmer=False)``'s
  tokenizer, then ``rouge_scorer._score_lcs(pool_tokens, candidate_tokens)`` against every pool
  prompt (one process);
* ``rouge_score_naive``: ``RougeScorer.score(pool_prompt, candidate)`` for every pair (what a
  plain script does: both texts re-tokenized at every call);
* ``ours_accepts``: :class:`selfalign.stages.rouge.RougeFilter` ``offer`` (length window, LCS
  cutoff, one rapidfuzz ``cdist`` call per candidate);
* ``ours_max_score``: ``RougeFilter.max_score`` (the highest F against the whole pool, which the
  self_instruct stage records with each candidate), then ``add`` when it is below 0.7.

Both selfalign rows run all 2,000 candidates, timed with building the 5,000-prompt pool. The
rouge-score rows are too slow for that (hours): they run a random sample of the candidates
(``--sample``, seeded), each against the pool exactly as it stood when selfalign's filter
reached that candidate (the 5,000 plus the candidates kept before it), and their time is
extrapolated linearly in the number of (candidate, pool prompt) comparisons the full task
makes. On the sample, every candidate's keep/reject decision, the set of kept candidates, and
the maximum F (compared exactly, as floats) must be identical between the package and
selfalign; the run fails otherwise.

Semantics are like for like: rouge-score without stemming (selfalign's filter does not stem),
its default tokenizer (lowercase, runs of characters outside [a-z0-9] separate tokens), its
LCS and F formula; ``RougeFilter`` reproduces these exactly (see the module docstring of
selfalign.stages.rouge).

Data (from ../shared/data, see SOURCES.md): the distinct user prompts of the OASST prompt
lottery, the OASST trees' prompter turns, AlpacaEval, MT-Bench and LLMBar (at most 150 tokens),
shuffled with the seed; 700 of them are held out as novel candidates and the rest start the
pool, which is filled up to 5,000 with sentences (4-60 words) split from those prompts and then
from the UD English web documents. The other 1,300 candidates imitate a model paraphrasing its
few-shot examples: a random pool prompt with a random fraction (0-50%) of its words deleted,
replaced by a corpus word, or swapped with a neighbour (seeded), so the set has both near
duplicates and novel prompts on either side of the threshold.

    .venv/bin/python benchmarks/rouge.py                  # 2,000 x 5,000, 40 sampled for rouge-score
    .venv/bin/python benchmarks/rouge.py --quick          # 200 x 500, 10 sampled

Results: benchmarks/results/rouge.json (``--results-name`` to change).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, machine_info, print_table, ratio, write_results  # noqa: E402

BASELINE = "rouge_score"
MAX_PROMPT_TOKENS = 150
_SENT_SPLIT = re.compile(r"(?<=[.?!])\s+|\n+")
_SPACES = re.compile(r"\s+")


# ----------------------------------------------------------------------------- data
def _need(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is absent: this benchmark reads the shared data folder next to the checkout")
    return path


def real_prompts() -> list[str]:
    """Distinct user prompts of the shared prompt files, in a fixed order."""
    from selfalign.data.oasst import load_oasst
    from selfalign.stages.rouge import rouge_tokenize

    texts: list[str] = []
    with open(_need(SHARED_DATA / "oasst" / "oasst_prompt_lottery_en_250.jsonl")) as f:
        texts += [json.loads(line) for line in f if line.strip()]
    for tree in load_oasst(_need(SHARED_DATA / "oasst" / "oasst_en_100_trees.jsonl")):
        texts += [m.text for m in tree.root.walk() if m.role == "prompter"]
    texts += [x["instruction"] for x in json.loads(_need(SHARED_DATA / "alpaca_eval" / "alpaca_eval_805_ref_gpt4_1106_preview.json").read_text())]
    with open(_need(SHARED_DATA / "mt_bench" / "question.jsonl")) as f:
        for line in f:
            if line.strip():
                texts += json.loads(line)["turns"]
    for path in sorted(glob.glob(str(_need(SHARED_DATA / "preference" / "llmbar") / "*.json"))):
        texts += [x["input"] for x in json.loads(Path(path).read_text())]
    seen: dict[str, str] = {}
    for t in texts:
        key = _SPACES.sub(" ", t.strip().lower())
        if key and key not in seen and 1 <= len(rouge_tokenize(t)) <= MAX_PROMPT_TOKENS:
            seen[key] = t.strip()
    return list(seen.values())


def sentences(texts: list[str]) -> list[str]:
    out, seen = [], set()
    for t in texts:
        for s in _SENT_SPLIT.split(t):
            s = s.strip()
            if 4 <= len(s.split()) <= 60 and s.lower() not in seen:
                seen.add(s.lower())
                out.append(s)
    return out


def perturb(text: str, fraction: float, vocab: list[str], rng: random.Random) -> str:
    """Delete, replace or swap about ``fraction`` of the words of ``text``."""
    words = text.split()
    for _ in range(round(fraction * len(words))):
        if len(words) < 2:
            break
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 1 / 3:
            del words[i]
        elif op < 2 / 3:
            words[i] = rng.choice(vocab)
        else:
            j = min(i + 1, len(words) - 1)
            words[i], words[j] = words[j], words[i]
    return " ".join(words)


def build_task(pool_size: int, num_candidates: int, seed: int) -> tuple[list[str], list[str], dict]:
    """``(pool, candidates, composition)``; deterministic for a seed."""
    rng = random.Random(seed)
    prompts = real_prompts()
    rng.shuffle(prompts)
    novel = min(round(num_candidates * 0.35), len(prompts) // 3)
    held, rest = prompts[:novel], prompts[novel:]
    pool = rest[:pool_size]
    fill = sentences(rest) + sentences(
        [json.loads(line)["text"] for line in open(_need(SHARED_DATA / "web_text" / "ud_english_ewt_web_docs.jsonl")) if line.strip()]
    )
    have = {p.lower() for p in pool}
    for s in fill:
        if len(pool) >= pool_size:
            break
        if s.lower() not in have:
            have.add(s.lower())
            pool.append(s)
    if len(pool) < pool_size:
        raise SystemExit(f"only {len(pool)} distinct pool texts could be built, {pool_size} asked for")
    vocab = sorted({w for t in pool for w in t.split()})
    edited = [perturb(rng.choice(pool), rng.uniform(0.0, 0.5), vocab, rng) for _ in range(num_candidates - len(held))]
    candidates = held + edited
    rng.shuffle(candidates)
    composition = {
        "pool_real_prompts": min(len(rest), pool_size),
        "pool_sentences": pool_size - min(len(rest), pool_size),
        "candidates_novel_prompts": len(held),
        "candidates_edited_pool_texts": len(edited),
    }
    return pool, candidates, composition


# ----------------------------------------------------------------------------- rows
def run_ours_accepts(pool: list[str], candidates: list[str], threshold: float) -> tuple[float, list[bool]]:
    from selfalign.stages.rouge import RougeFilter

    t0 = time.perf_counter()
    f = RougeFilter(threshold, pool)
    kept = [f.offer(c) for c in candidates]
    return time.perf_counter() - t0, kept


def run_ours_max_score(pool: list[str], candidates: list[str], threshold: float) -> tuple[float, list[bool], list[float]]:
    from selfalign.stages.rouge import RougeFilter

    t0 = time.perf_counter()
    f = RougeFilter(threshold, pool)
    kept, scores = [], []
    for c in candidates:
        score, _ = f.max_score(c)
        scores.append(score)
        kept.append(score < threshold)
        if kept[-1]:
            f.add(c)
    return time.perf_counter() - t0, kept, scores


def run_rouge_score(pool: list[str], candidates: list[str], kept: list[bool], sample: list[int], naive: bool) -> tuple[float, int, dict[int, float]]:
    """Max F of each sampled candidate against the pool as it stood then; ``(seconds, comparisons, max F by index)``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    wanted = set(sample)
    best: dict[int, float] = {}
    comparisons = 0
    seconds = 0.0
    live = list(pool)  # texts, for the naive row
    live_tokens: list[list[str]] | None = None
    if not naive:
        t0 = time.perf_counter()
        live_tokens = [scorer._tokenizer.tokenize(t) for t in pool]  # Self-Instruct tokenizes its pool once
        seconds += time.perf_counter() - t0
    for i, cand in enumerate(candidates):
        if i in wanted:
            t0 = time.perf_counter()
            if naive:
                m = max(scorer.score(ref, cand)["rougeL"].fmeasure for ref in live)
            else:
                ct = scorer._tokenizer.tokenize(cand)
                m = max(rouge_scorer._score_lcs(rt, ct).fmeasure for rt in live_tokens)
            seconds += time.perf_counter() - t0
            comparisons += len(live)
            best[i] = m
        if kept[i]:  # the pool grows exactly as it did in selfalign's run (checked on the sample)
            live.append(cand)
            if live_tokens is not None:
                t0 = time.perf_counter()
                live_tokens.append(scorer._tokenizer.tokenize(cand))
                seconds += time.perf_counter() - t0
    return seconds, comparisons, best


# ----------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pool", type=int, default=5000, help="prompts in the pool at the start")
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--sample", type=int, default=40, help="candidates the rouge-score rows run (their time is extrapolated)")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="selfalign rows: best of this many runs")
    p.add_argument("--no-naive", action="store_true", help="skip the rouge_score_naive row")
    p.add_argument("--quick", action="store_true", help="pool 500, 200 candidates, sample 10 (a smoke test)")
    p.add_argument("--results-name", default="rouge", help="benchmarks/results/<name>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.pool, args.candidates, args.sample = 500, 200, 10
    info = machine_info()
    pool, candidates, composition = build_task(args.pool, args.candidates, args.seed)
    print(f"pool {len(pool)}, candidates {len(candidates)}, threshold {args.threshold}; load {info['load_average']}", flush=True)

    t_acc, kept = min((run_ours_accepts(pool, candidates, args.threshold) for _ in range(args.repeats)), key=lambda r: r[0])
    t_max, kept_max, scores = min((run_ours_max_score(pool, candidates, args.threshold) for _ in range(args.repeats)), key=lambda r: r[0])
    if kept_max != kept:
        raise SystemExit("RougeFilter.offer and max_score disagree on some candidate")
    # comparisons the full task makes: each candidate against the pool as it stood then
    total_cmp, size = 0, len(pool)
    for k in kept:
        total_cmp += size
        size += k
    sample = sorted(random.Random(args.seed + 1).sample(range(len(candidates)), min(args.sample, len(candidates))))

    rows: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    for name, naive in ((BASELINE, False), ("rouge_score_naive", True)):
        if naive and args.no_naive:
            continue
        print(f"-- {name}: {len(sample)} sampled candidates (load {info_load()})", flush=True)
        secs, cmps, best = run_rouge_score(pool, candidates, kept, sample, naive)
        decided = {i: best[i] < args.threshold for i in sample}
        mismatched = [i for i in sample if decided[i] != kept[i]]
        score_diff = [i for i in sample if best[i] != scores[i]]
        checks[name] = {
            "sampled": sample,
            "decisions_identical": not mismatched,
            "kept_set_identical": {i for i in sample if decided[i]} == {i for i in sample if kept[i]},
            "max_f_identical": not score_diff,
            "mismatched": mismatched,
            "max_f_differs": score_diff,
            "sample_kept": sum(decided.values()),
        }
        rows[name] = {
            "measured_seconds": secs,
            "measured_candidates": len(sample),
            "measured_comparisons": cmps,
            "seconds": secs * total_cmp / cmps,
            "extrapolated": True,
        }
    rows["ours_accepts"] = {"seconds": t_acc, "extrapolated": False}
    rows["ours_max_score"] = {"seconds": t_max, "extrapolated": False}

    base = rows.get(BASELINE, {}).get("seconds")
    table = []
    for name, r in rows.items():
        r["candidates_per_s"] = len(candidates) / r["seconds"]
        r["comparisons_per_s"] = total_cmp / r["seconds"]
        r["speedup_vs_baseline"] = ratio(base, r["seconds"])
        table.append({
            "row": name,
            "how": f"extrapolated from {r['measured_candidates']} candidates ({r['measured_seconds']:.1f} s)" if r["extrapolated"] else "all candidates (best of %d)" % args.repeats,
            "seconds": r["seconds"],
            "candidates_per_s": r["candidates_per_s"],
            "speedup": r["speedup_vs_baseline"],
            "decisions": ("identical" if checks[name]["decisions_identical"] and checks[name]["max_f_identical"] else "DIFFER") if name in checks else "-",
        })
    text = print_table(
        table,
        [("row", "row"), ("how", "measured"), ("seconds", "s (all candidates)", ".2f"),
         ("candidates_per_s", "candidates/s", ".1f"), ("speedup", f"x faster than {BASELINE}", ".1f"),
         ("decisions", "decisions on sample")],
        title=f"ROUGE-L filter: {len(candidates)} candidates vs a pool of {len(pool)} (kept {sum(kept)}; {total_cmp:,} comparisons)",
    )
    ok = all(c["decisions_identical"] and c["kept_set_identical"] and c["max_f_identical"] for c in checks.values())
    path = write_results(args.results_name, {
        "benchmark": "rouge",
        "command": "python benchmarks/rouge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "load_average_end": machine_info()["load_average"],
        "threshold": args.threshold,
        "seed": args.seed,
        "pool": len(pool),
        "candidates": len(candidates),
        "composition": composition,
        "kept": sum(kept),
        "comparisons": total_cmp,
        "baseline": BASELINE,
        "rows": rows,
        "checks": checks,
        "all_checks_passed": ok,
        "table": table,
        "table_text": text,
    })
    print(f"decisions, kept set and max F identical on the {len(sample)} sampled candidates: {ok}")
    print(f"results: {path}")
    return 0 if ok else 1


def info_load() -> str:
    import os

    return f"{os.getloadavg()[0]:.2f}"


if __name__ == "__main__":
    sys.exit(main())
