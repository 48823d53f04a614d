"""What a person reads in MLflow's UI: run names, the study run's note, the experiment's description."""

from __future__ import annotations

from typing import Iterable, Mapping

#: Tag whose Markdown MLflow's UI shows as the description of a run, and of an experiment.
NOTE_TAG = "mlflow.note.content"


def run_name(variant_label: str, seed: int | None = None) -> str:
    """``<variant>-seed<k>`` (the study is the experiment, the trial number a tag); the label alone without a seed."""
    return variant_label if seed is None else f"{variant_label}-seed{seed}"


def _table(rows: Mapping[str, str]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]


def parent_note(report_url: str | None, *, study: str, view_url: str | None = None,
                headline: Mapping[str, str] | None = None, report_command: str | None = None) -> str:
    """Markdown for the study run's ``mlflow.note.content``: a link to the report (or how to write it), the
    comparison view, and the report's headline figures (``headline``: label -> value as text)."""
    lines = [f"**Study `{study}`**: one child run per trial, named `<variant>-seed<k>`.", ""]
    if report_url:
        lines.append(f"**Report:** [{study} report]({report_url}) (`report/index.html` of this run).")
    else:
        how = f": `{report_command}`" if report_command else ""
        lines.append(f"**Report:** not written yet{how}.")
    if view_url:
        lines.append(f"**Compare the variants:** [runs grouped by variant]({view_url}).")
    if headline:
        lines += ["", *_table(headline)]
    return "\n".join(lines) + "\n"


def experiment_description(study: str, *, variant_params: Iterable[str], primary_metric: str,
                           view_name: str | None = None, report_command: str | None = None) -> str:
    """Markdown for the experiment's description: what the runs are, where the report is, which view to open."""
    params = ", ".join(f"`{p}`" for p in variant_params) or "the swept values"
    lines = [
        f"Ablation study `{study}`. Each variant (a value of {params}) is trained once per seed; "
        "a child run is one trial, named `<variant>-seed<k>` and coloured by variant. The run tagged "
        "`ablate.role = study` holds the study's settings, its summary metrics and the report.",
        "",
        f"- **Compare:** open the saved view *{view_name}* (views menu above the runs table): one group per "
        f"variant with the mean of each column, sorted by `{primary_metric}`." if view_name else
        f"- **Compare:** group the runs table by the `ablate.variant` tag and sort by `{primary_metric}`.",
        "- **Per run:** `summary.*` metrics compare whole curves (best and final values, fluctuation), "
        "`gate.*` the network's gates per epoch; per-layer gate statistics are the `gate_stats.csv` artifact.",
        "- **Report:** the study run's `report/index.html` artifact (its note links it)"
        + (f"; write it with `{report_command}`." if report_command else "."),
    ]
    return "\n".join(lines) + "\n"
