"""The routing study in one command: ``python -m tinymoe findings``.

Trains the runs the study needs (the MoE over several seeds, dense twins of equal active
and of equal total parameters, the MoE without one domain), resumably, then writes one
report: ``findings.md`` (the findings table: finding, measure, effect, baseline,
interval, verdict), its PNGs and ``findings.json``. See docs/findings.md.

=============  ======================================================================
``plan``       the runs, the dense twins' configs, FLOPs per update, running a run
               resumably (skip finished, resume interrupted)
``measures``   held-out loss per window with intervals (expert removal, held-out
               domain), the spread over seeds, the scale criteria and their caveat
``report``     the findings rows, ``findings.md``, the loss-vs-FLOPs and removal figures
``cli``        the command: :func:`add_arguments` and :func:`run`
=============  ======================================================================
"""
from __future__ import annotations

from tinymoe.study.cli import add_arguments, run
from tinymoe.study.measures import (REMOVAL_MIN, ZERO_CAPACITY, compare_losses, scale_criteria,
                                    seed_summary, window_losses)
from tinymoe.study.plan import (KINDS, RunSpec, StudySettings, dense_twin, flops_per_update,
                                plan_runs, run_one, run_state)
from tinymoe.study.report import findings_rows, format_markdown

__all__ = ["add_arguments", "run", "KINDS", "RunSpec", "StudySettings", "dense_twin",
           "plan_runs", "run_state", "run_one", "flops_per_update", "compare_losses",
           "window_losses", "seed_summary", "scale_criteria", "REMOVAL_MIN", "ZERO_CAPACITY",
           "findings_rows", "format_markdown"]
