"""How a study looks in MLflow's UI: a saved comparison view, variant colours, run names, notes, links,
network-level gate metrics, system metrics, dataset inputs and source tags (docs/ui.md)."""

from ablate.ui.gates import (
    AGGREGATE_STATS, CONSTANT_STATS, GateHeatmapInfo, gate_aggregates, gate_heatmap_info, gate_heatmap_plot,
    gate_metric,
)
from ablate.ui.links import (
    StudyLinks, UiLinks, artifact_url, compare_url, format_study_links, runs_url, study_links, ui_base, ui_links,
)
from ablate.ui.palette import RUN_COLOR_TAG, canonical_order, variant_color, variant_colors
from ablate.ui.provenance import config_digest, log_dataset_inputs, source_tags
from ablate.ui.system import start_system_metrics, stop_system_metrics, system_metrics_enabled
from ablate.ui.text import NOTE_TAG, experiment_description, parent_note, run_name
from ablate.ui.view import (
    SAVED_VIEW_ID, comparison_view_tags, decode_view_tag, experiment_kind_tags, supported, view_state,
)

__all__ = [
    "AGGREGATE_STATS", "CONSTANT_STATS", "NOTE_TAG", "RUN_COLOR_TAG", "SAVED_VIEW_ID", "GateHeatmapInfo",
    "StudyLinks", "UiLinks", "artifact_url", "canonical_order", "compare_url", "comparison_view_tags",
    "config_digest", "decode_view_tag", "experiment_description", "experiment_kind_tags", "format_study_links",
    "gate_aggregates", "gate_heatmap_info", "gate_heatmap_plot", "gate_metric", "log_dataset_inputs", "parent_note",
    "run_name", "runs_url", "source_tags", "start_system_metrics", "stop_system_metrics", "study_links",
    "supported", "system_metrics_enabled", "ui_base", "ui_links", "variant_color", "variant_colors", "view_state",
]
