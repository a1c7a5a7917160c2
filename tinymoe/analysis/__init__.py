"""Routing analysis: the OpenMoE paper's three findings, as numbers, tables and plots.

Xue et al. 2024 ("OpenMoE", section 5) report three properties of a trained MoE router:

1. **Context-independent specialization.** The expert a token goes to depends mostly on
   the token id, hardly on the context or the domain. Measured here per MoE layer on
   held-out text by
   (a) a *majority-expert predictor*: fit on one half of the windows, for each key (token
       id, or position id) the most frequent top-1 expert; scored on the other half as
       the share of tokens whose top-1 expert it predicts. Compared with chance 1/E and
       with the honest baseline "always predict the most used expert" (majority class);
   (b) the paper's measure: for each key seen at least ``m`` times, the distribution
       ``d_e = n(key, e) / n(key)`` of its top-1 expert; its standard deviation across the
       E experts ``sqrt(mean_e (d_e - 1/E)^2)``, averaged over keys. 0 = spread evenly,
       maximal ``sqrt(E - 1) / E`` = always the same expert. A shuffled baseline (experts
       permuted across tokens) shows the value finite samples give without any
       specialization;
   (c) the share of each expert in each domain's assignments;
   (d) the top tokens of each expert (most frequent, and most specific by lift
       ``P(e | id) / P(e)``).
2. **Early routing learning.** Routing is fixed early in training: for each routing
   snapshot of a fixed probe batch (written by the trainer with ``--snapshot-every``),
   per-token agreement with the final snapshot (ceiling exactly 1) with intervals over
   probe sequences, and the majority expert per id (per id and occurrence-weighted) on
   split halves of the probe, next to its ceiling (the final routing against itself), set
   against the train loss.
3. **Drop-towards-the-end.** With ``position`` slot priority, slots fill in token order, so
   when an expert is over-subscribed the *late* tokens of a group are the ones dropped.
   Dropped fraction of assignments (first and second choices separately) against the
   position inside the routing group, at the train and eval capacity factors, at the
   model's group size and a paper-like one, on in-distribution text, on "multi-turn"
   sequences stitched from several domains, and on a domain left out of training, against
   balanced random routing at the same shape and capacity (which already drops more at the
   end); the loss cost of the drops per position; then the cures on the same data:
   dropless, ``probability`` slot priority, a larger capacity factor, and (``--compare``)
   a model trained with the shifted data mixed in.

Every verdict is an effect against a baseline, with 95% bootstrap intervals: PASS iff the
effect's interval lies entirely above the baseline's (:func:`.baselines.verdict`). The
baselines: balanced random routing at the model's shape, capacity and slot priority (for
drops), the shuffled-label predictor, the position predictor and the untrained router
(for specialization), the ceiling of each agreement measure (for early routing).

One job per module; imports flow one way, each module using only those above it:

=================  ===================================================================
``measures``       pure measures: plain host arrays in, numbers out (no model, no files)
``baselines``      baselines, bootstrap intervals and the verdict rule (pure; simulates
                   random routing with :mod:`tinymoe.routing`)
``collect``        runs a model on token windows (:func:`collect_routing`) and reads the
                   trainer's routing snapshots (:func:`load_snapshots`)
``report``         the whole analysis of one model as a JSON-ready dict (:func:`analyze`)
``plots``          one PNG per finding, from the report's sections
``text``           the terminal tables, from the report (:func:`format_report`)
``cli``            ``python -m tinymoe analyze``: :func:`add_arguments` and :func:`run`
=================  ===================================================================

Every public name is re-exported here, so ``from tinymoe import analysis`` followed by
``analysis.collect_routing(...)``, ``analysis.run(args)`` ... works as it did when the
package was one module.
"""
from __future__ import annotations

from tinymoe.analysis.baselines import (
    bootstrap_ratio, ce_cost_by_position, ceiling_by_probe_size, drop_difference, drop_statistics,
    expected_drop_by_position, expected_drop_summary, interval, random_drop_baseline,
    simulate_random_routing, specialization_statistics, split_half_agreement,
    token_agreement, verdict)
from tinymoe.analysis.cli import add_arguments, run
from tinymoe.analysis.collect import (
    RoutingTrace, collect_routing, load_snapshots, routing_settings, token_windows)
from tinymoe.analysis.measures import (
    drop_by_position, drop_quarters, early_routing, expert_share_by_domain, key_expert_counts,
    majority_agreement, majority_expert, max_routing_std, position_in_group, predictor_accuracy,
    routing_std, shuffled_routing_std, specialization_predictors, token_label,
    top_tokens_per_expert)
from tinymoe.analysis.plots import (
    plot_domain_share, plot_drop_vs_position, plot_early_routing, plot_report, plot_specialization)
from tinymoe.analysis.report import _summary  # noqa: F401 (the tests check its rules)
from tinymoe.analysis.report import (
    EARLY_FRACTION, EARLY_THRESHOLD, analyze, drop_report, early_routing_report, early_routing_verdict, findings_table,
    specialization_report)
from tinymoe.analysis.text import format_markdown, format_report
from tinymoe.jsonio import json_ready as _json_ready  # noqa: F401 (its name in analysis.py)

__all__ = [
    # pure measures
    "key_expert_counts", "majority_expert", "predictor_accuracy", "specialization_predictors",
    "routing_std", "max_routing_std", "shuffled_routing_std", "expert_share_by_domain",
    "top_tokens_per_expert", "majority_agreement", "early_routing", "position_in_group",
    "drop_by_position", "drop_quarters", "token_label", "token_windows",
    # baselines, intervals, verdicts
    "interval", "verdict", "bootstrap_ratio", "simulate_random_routing",
    "expected_drop_by_position", "expected_drop_summary", "drop_statistics",
    "random_drop_baseline", "drop_difference", "ce_cost_by_position",
    "specialization_statistics", "split_half_agreement", "token_agreement",
    "ceiling_by_probe_size", "EARLY_FRACTION", "EARLY_THRESHOLD",
    # report sections
    "specialization_report", "drop_report", "early_routing_report", "early_routing_verdict", "findings_table",
    # collection from a model
    "RoutingTrace", "routing_settings", "collect_routing", "load_snapshots",
    # plots and report
    "plot_specialization", "plot_domain_share", "plot_early_routing",
    "plot_drop_vs_position", "plot_report", "format_report", "format_markdown", "analyze", "add_arguments", "run",
]
