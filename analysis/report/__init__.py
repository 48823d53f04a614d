"""The fluctuation report: compute everything (``build_report_data``), then write it (``write_report``)
and log it back to MLflow (``log_report``).

Files in the output folder: ``index.html`` (plotly figures with plotly.js embedded once, readable
offline), ``summary.md`` (opens with ``## Findings``: the pre-declared comparison's supported effects
ranked by effect size, what was tested and not supported, exploratory results, mechanism evidence),
``comparisons.csv`` (``analysis.stats.compare_groups``), ``run_metrics.csv`` (one row per run),
and when the runs have them ``gate_layer_epoch.csv``, ``flip_coupling.csv``, ``gate_association.csv``,
``churn.csv``, ``sensitivity.csv``.

Modules: ``data`` (``ReportData``, the tables), one per figure (``loss_curves``, ``fluctuation_bars``,
``gate_heatmap``, ``flip_scatter``), ``findings`` (the sentences), ``render`` (HTML, Markdown, CSV) and
``log`` (MLflow). Every figure follows Optuna's split: ``get_<figure>_info(data)`` returns plain data in
a NamedTuple (tests read it) and ``get_<figure>_plot(info)`` only draws it.

Honest statistics (docs/report.md): metrics use the window after warm-up (``fluctuation.window_start``)
unless ``from_epoch`` is given; the verdict is on ``PRIMARY`` only, with BH q over that family; a
comparison whose arms have fewer runs than ``min_seeds_for(ALPHA)`` prints "too few runs" instead of a
CI, and one with fewer than 2 runs has no p-value at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from analysis.report.data import (
    ALPHA,
    KEY_METRICS,
    PRIMARY,
    ReportData,
    build_report_data,
    churn_table,
    report_sensitivity,
    run_metric_table,
)
from analysis.report.findings import (
    churn_findings,
    exploratory_findings,
    findings_sections,
    fluctuation_findings,
    header_lines,
    key_table,
    sensitivity_findings,
)
from analysis.report.flip_scatter import FlipScatterInfo, get_flip_scatter_info, get_flip_scatter_plot
from analysis.report.fluctuation_bars import FluctuationInfo, get_fluctuation_info, get_fluctuation_plot
from analysis.report.gate_heatmap import HeatmapInfo, get_gate_heatmap_info, get_gate_heatmap_plot
from analysis.report.log import log_report
from analysis.report.loss_curves import CurveInfo, get_loss_curves_info, get_loss_curves_plot
from analysis.report.render import csv_tables, index_html, summary_markdown, write_report


def make_report(client, experiment: str, out_dir: str | Path, group_by: Sequence[str] | None = None,
                baseline: str | None = None, from_epoch: int | None = None, sensitivity: bool = False,
                log: bool = True) -> tuple[Path, str | None]:
    """Validate and compute, then write the report and (``log``) log it to MLflow: (index.html, run id)."""
    data = build_report_data(client, experiment, group_by, baseline, from_epoch, sensitivity)
    index = write_report(data, out_dir)
    run_id = log_report(client, data, out_dir) if log else None
    return index, run_id


__all__ = [
    "ALPHA",
    "KEY_METRICS",
    "PRIMARY",
    "CurveInfo",
    "FlipScatterInfo",
    "FluctuationInfo",
    "HeatmapInfo",
    "ReportData",
    "build_report_data",
    "churn_findings",
    "churn_table",
    "csv_tables",
    "exploratory_findings",
    "findings_sections",
    "fluctuation_findings",
    "get_flip_scatter_info",
    "get_flip_scatter_plot",
    "get_fluctuation_info",
    "get_fluctuation_plot",
    "get_gate_heatmap_info",
    "get_gate_heatmap_plot",
    "get_loss_curves_info",
    "get_loss_curves_plot",
    "header_lines",
    "index_html",
    "key_table",
    "log_report",
    "make_report",
    "report_sensitivity",
    "run_metric_table",
    "sensitivity_findings",
    "summary_markdown",
    "write_report",
]
