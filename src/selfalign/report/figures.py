"""Which figures a run's report gets, drawn from its :class:`~selfalign.report.rundata.RunData`.

:func:`draw_figures` decides from the data what can be shown (a figure per kind of record the run
holds) and calls the drawing functions of :mod:`selfalign.report.plots` and
:mod:`selfalign.report.trend_plots`; a figure that fails to draw becomes a note, never an error.
"""

from __future__ import annotations

import re

from selfalign.report.rundata import RunData, is_number

# figures the report may write; stale ones (from an earlier report) are removed
FIGURES = ("scores", "pairs", "curation", "parse_failures", "lengths", "training", "judge_agreement", "winrate", "corpus",
           "trends", "ifeval")


def draw_figures(data: RunData) -> tuple[list[dict], list[str]]:
    """Draw every figure the data allows: ``[{name, section, title, caption, png}]`` and notes
    about figures that failed (a broken figure never stops the report)."""
    from selfalign.report import plots, trend_plots

    its = data.iterations
    labels = [it.label for it in its]
    m = [it.metrics or {} for it in its]
    figs: list[dict] = []
    notes: list[str] = []

    def add(name, section, title, caption, fn, /, *args, **kwargs):
        try:
            png = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - report what failed, keep the rest
            notes.append(f"figure {name!r} could not be drawn: {type(e).__name__}: {e}")
            return
        if png:
            figs.append({"name": name, "section": section, "title": title, "caption": caption, "png": png})

    if its:
        add("scores", "scores", "Score distribution",
            "Left: every judgment's score, rounded to the nearest whole score, as a share of the iteration's "
            "judgments (from judge.jsonl, or Humpback's curate.jsonl; metrics' score_histogram where that file "
            "is missing). Right: each "
            "response's reward, the mean of its judgments: box = quartiles, line = median, red diamond = mean. "
            "Pairs are made from these rewards, so a narrow box means many ties.",
            plots.score_distribution, labels, [it.judgment_scores for it in its],
            [it.response_rewards for it in its], [mm.get("score_histogram") for mm in m])
        add("pairs", "pairs", "Pairs kept and dropped",
            "Per iteration: prompts that gave a preference pair (green) and prompts without one, by reason "
            "(e.g. tie: best and worst candidate got the same reward; too_few_scored: fewer than two scored "
            "candidates). Meta-Rewarding adds the judge pairs the meta-judge selected, per response.",
            plots.pairs_breakdown, labels, [it.pairs_kept for it in its], [it.pairs_dropped for it in its],
            [it.judge_pairs_kept for it in its], [it.judge_pairs_dropped for it in its],
            [f"schedule: {mm['schedule']}" if mm.get("schedule") and "judge" not in str(mm["schedule"]) else None for mm in m])
        curated = [mm.get("curated") for mm in m]
        rated = [mm.get("pairs_rated") for mm in m]
        if any(is_number(c) for c in curated) and any(is_number(r) for r in rated):
            below = []
            for mm in m:
                c, r, u = mm.get("curated"), mm.get("pairs_rated"), mm.get("unrated_pairs")
                d = {}
                if is_number(c) and is_number(r):
                    unrated = int(u) if is_number(u) else 0
                    d = {f"rated below {mm.get('curation_threshold', 'k')}": max(int(r) - int(c) - unrated, 0), "unrated": unrated}
                below.append(d)
            add("curation", "pairs", "Curation",
                "Per round: augmented (instruction, output) pairs kept by self-curation (green) and the others: "
                "rated below the threshold, or with no parsable rating.",
                plots.pairs_breakdown, labels, [int(c) if is_number(c) else None for c in curated], below,
                title="Self-curation per round", kept_label="curated", unit="augmented pairs")
        meta_rates = []
        for it, mm in zip(its, m):
            if it.meta_comparisons:
                meta_rates.append(it.meta_parse_failures / it.meta_comparisons)
            elif is_number(mm.get("meta_parse_failures")) and is_number(mm.get("meta_comparisons")) and mm["meta_comparisons"]:
                meta_rates.append(mm["meta_parse_failures"] / mm["meta_comparisons"])
            else:
                meta_rates.append(None)
        add("parse_failures", "parse-failures", "Parse failures",
            "Share of judgments whose score could not be parsed, split by error kind (from judge.jsonl). "
            "Such a judgment counts for nothing when the reward is averaged.",
            plots.parse_failures, labels, [dict(it.parse_errors) for it in its], [it.judgments for it in its],
            [mm.get("parse_failure_rate") for mm in m], meta_rates)
        extra = {name: [mm.get(key) for mm in m] for key, name in
                 (("mean_chosen_tokens", "pairs, chosen (mean)"), ("mean_rejected_tokens", "pairs, rejected (mean)"))}
        word_keys = list(dict.fromkeys(k for mm in m for k in mm if "mean_" in k and k.endswith("_words")))
        words = {k.replace("_", " "): [mm.get(k) for mm in m] for k in word_keys}
        add("lengths", "lengths", "Response length",
            "Completion tokens of the candidate responses per iteration (from respond.jsonl): mean, and median "
            "with the middle half as whiskers. A steady rise is the length bias of a self-judge. Word counts "
            "come from metrics.json (e.g. the curated instructions and outputs of instruction backtranslation).",
            plots.response_lengths, labels, [it.lengths for it in its],
            [mm.get("mean_response_tokens") for mm in m], extra, words)
    if data.trainings:
        add("training", "training", "Training",
            "Loss per logged optimizer step of every model the run trained (SFT of the seed model, the DPO of "
            "each iteration); for DPO also the reward margin (chosen minus rejected implicit reward, solid) "
            "and the share of pairs the policy already ranks right (dotted, right axis).",
            trend_plots.training_curves, [(label, hist) for label, hist, _ in data.trainings])
    if data.judge_evals:
        add("judge_agreement", "judge-agreement", "Judge agreement",
            "How often the judge ranks responses the way the reference labels do, next to the baselines "
            "(random scores; always preferring the longer response), overall and split by whether the preferred "
            "response is the longer or the shorter one. Length-balanced accuracy is the mean of the two; 50% "
            "means nothing beyond length was learned. Whiskers: 95% bootstrap intervals over prompts.",
            trend_plots.judge_agreement, data.judge_evals)
    if data.winrate_evals:
        add("winrate", "winrate", "Win rate",
            "Pairwise comparisons of model A against model B: wins, ties and losses, and the win rate (ties "
            "count half) with its bootstrap 95% interval. Left of the dotted line B is better.",
            trend_plots.winrates, data.winrate_evals)
    if any("ifeval_prompt_level_strict" in mm for mm in m):
        add("ifeval", "ifeval", "IFEval",
            "IFEval (judge-free instruction following) of the model the run starts from and of the model each "
            "iteration trained: share of prompts whose answer follows all their instructions (prompt level) and "
            "of all instructions followed (instruction level), strict (solid) and loose (dotted), on the subset "
            "eval.ifeval names, with 95% bootstrap intervals over prompts.",
            trend_plots.ifeval_across_iterations, labels, m)
    if data.corpus:
        kept = data.corpus.get("kept")
        dropped = data.corpus.get("dropped")
        if (is_number(kept) or isinstance(dropped, dict)):
            add("corpus", "corpus", "Corpus",
                "The training corpus: examples kept and dropped, by reason (corpus.json).",
                plots.kept_dropped, "Corpus: kept and dropped", int(kept) if is_number(kept) else None,
                dropped if isinstance(dropped, dict) else {})
    # any other {bucket: count} metric, e.g. Humpback's curation_score_histogram
    hist_keys = []
    for mm in m:
        for k, v in mm.items():
            if k != "score_histogram" and k.endswith("histogram") and isinstance(v, dict) and k not in hist_keys:
                hist_keys.append(k)
    for k in hist_keys:
        safe = re.sub(r"[^A-Za-z0-9_]+", "_", k)[:60]
        add(f"hist_{safe}", "histograms", k.replace("_", " "),
            f"metrics.json key {k}: each bucket's share of the iteration's total.",
            trend_plots.histograms, k.replace("_", " "), labels, [mm.get(k) for mm in m])
    complete = [i for i, it in enumerate(its) if it.complete]
    if len(complete) >= 2:
        keys = []
        for i in complete:
            for k, v in m[i].items():
                if k != "iteration" and is_number(v) and k not in keys:
                    keys.append(k)
        # only the metrics that moved: a flat line says nothing the table does not
        keys = [k for k in keys if len({m[i].get(k) for i in complete if is_number(m[i].get(k))}) > 1]
        add("trends", "trends", "Metric trends",
            "Every numeric metric of metrics.json that changed across the finished iterations (the constant "
            "ones are in the table).",
            trend_plots.trends, [labels[i] for i in complete], {k: [m[i].get(k) for i in complete] for k in keys})
    return figs, notes
