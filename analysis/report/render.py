"""Write the report: ``index.html`` (figures with plotly.js embedded once), ``summary.md`` and the CSV tables."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from analysis import gates, stats
from analysis.report.data import ReportData
from analysis.report.findings import definitions, findings_sections, header_lines, key_table, sections
from analysis.report.fluctuation_bars import get_fluctuation_info, get_fluctuation_plot
from analysis.report.gate_heatmap import get_gate_heatmap_info, get_gate_heatmap_plot
from analysis.report.loss_curves import get_loss_curves_info, get_loss_curves_plot
from analysis.report.mechanism import mechanism_section


def summary_markdown(data: ReportData) -> str:
    """summary.md: the Findings first, then what was read, the key table, the detail sections, definitions."""
    parts = [f"# Fluctuation report: {data.runs.experiment_name}", "", "## Findings", ""]
    for title, lines in findings_sections(data):
        parts += [f"### {title}", "", *[f"- {line}" for line in lines], ""]
    parts += ["## What was compared", "", *header_lines(data), "",
              "## Key table", "", _markdown_table(key_table(data)), ""]
    for title, lines in sections(data):
        parts += [f"## {title}", "", *[f"- {line}" for line in lines], ""]
    parts += ["## Definitions", "", *[f"- `{k}`: {v}" for k, v in definitions(data).items()], ""]
    return "\n".join(parts)


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def figures(data: ReportData) -> list:
    """Every figure of the report, in page order."""
    figs = [get_loss_curves_plot(get_loss_curves_info(data))]
    info = get_fluctuation_info(data)
    if info.metrics:
        figs.append(get_fluctuation_plot(info))
    for kind, stat in gates.LAYER_STATS:
        heat = get_gate_heatmap_info(data, kind, stat)
        if heat is not None:
            figs.append(get_gate_heatmap_plot(heat))
    figs.extend(mechanism_section(data).figures)
    return figs


def _md_inline(text: str) -> str:
    """Escape for HTML and turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def index_html(data: ReportData) -> str:
    """The HTML page: Findings first, then what was compared, key table, details and figures (plotly.js once)."""
    body = [f"<h1>Fluctuation report: {html.escape(data.runs.experiment_name)}</h1>", "<h2>Findings</h2>"]
    for title, lines in findings_sections(data):
        body += [f"<h3>{html.escape(title)}</h3>", "<ul>", *[f"<li>{_md_inline(line)}</li>" for line in lines], "</ul>"]
    body.append("<h2>What was compared</h2>")
    body += [f"<p>{_md_inline(line)}</p>" for line in header_lines(data)]
    body += ["<h2>Key table</h2>", key_table(data).to_html(index=False, escape=True, border=0)]
    for title, lines in sections(data):
        body += [f"<h2>{html.escape(title)}</h2>", "<ul>", *[f"<li>{_md_inline(line)}</li>" for line in lines], "</ul>"]
    body.append("<h2>Figures</h2>")
    for i, fig in enumerate(figures(data)):
        body.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    body += ["<h2>Definitions</h2>", "<ul>",
             *[f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in definitions(data).items()], "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Fluctuation report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")


def csv_tables(data: ReportData) -> dict[str, pd.DataFrame]:
    """File name -> table, for the tables that have rows."""
    tables = {"comparisons.csv": data.comparisons[list(stats.RESULT_COLUMNS)], "run_metrics.csv": data.run_metrics,
              "gate_layer_epoch.csv": data.layer_stats, "churn.csv": data.churn, **mechanism_section(data).tables}
    if data.sensitivity is not None:
        tables["sensitivity.csv"] = data.sensitivity
    return {name: t for name, t in tables.items() if name in ("comparisons.csv", "run_metrics.csv") or len(t)}


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write index.html, summary.md and the CSV tables into ``out_dir``; returns the index.html path.

    Everything is rendered first, then written, so a failure leaves no half-written report.
    """
    out = Path(out_dir)
    page = index_html(data)
    summary = summary_markdown(data)
    tables = csv_tables(data)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(out / name, index=False)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
