"""What a study looks like in MLflow's UI (ablate.ui): the saved comparison view against the pinned MLflow's UI
bundle and server, colours, names, notes, links, gate aggregates, system metrics, dataset inputs, source tags."""

from __future__ import annotations

import json
import logging
import math
import re
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate import track
from ablate.config import ORDERS, SCConvConfig
from ablate.names import GateKey, VARIANT_TAG
from ablate.nn import SCConv
from ablate.ui import gates, links, palette, provenance, system, text, view

BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
#: What MLflow 3.17's Runs page reads from a saved view (the literals the bundle test below finds): the search
#: facets it picks, and the UI-state keys it keeps (runsExpanded, runsPinned, runsHidden, runsVisibilityMap and
#: autoRefreshEnabled are dropped on save and on load).
BUNDLE_SEARCH_FACETS = ["searchFilter", "orderByKey", "orderByAsc", "startTime", "lifecycleFilter",
                        "modelVersionFilter", "datasetsFilter"]
BUNDLE_UI_STATE = ["selectedColumns", "columnOrder", "columnWidths", "runsExpanded", "runsPinned", "runsHidden",
                   "runsVisibilityMap", "runsHiddenMode", "compareRunCharts", "compareRunSections", "viewMaximized",
                   "runListHidden", "isAccordionReordered", "groupBy", "groupsExpanded", "autoRefreshEnabled",
                   "useGroupedValuesInCharts", "hideEmptyCharts", "globalLineChartConfig", "chartsSearchFilter"]
BUNDLE_NOT_SAVED = ["runsExpanded", "runsPinned", "runsHidden", "runsVisibilityMap", "autoRefreshEnabled"]
SUMMARY = ["summary.val_acc_best", "summary.val_loss_resid_sd"]


def _view(**kw) -> tuple[str, dict, dict]:
    tags = view.comparison_view_tags(mlflow.__version__, ["scconv.order"], SUMMARY, now_ms=1_700_000_000_000, **kw)
    (key, value), = tags.items()
    envelope, state = view.decode_view_tag(value)
    return key, envelope, state


# -- the saved view ---------------------------------------------------------------------------------------


def test_view_tag_round_trips_and_carries_every_key_the_runs_page_reads():
    key, envelope, state = _view()
    assert key == "mlflow.sharedViewState." + view.SAVED_VIEW_ID
    assert envelope["name"] == "Compare variants"
    assert envelope["createdAt"] == envelope["updatedAt"] == 1_700_000_000_000
    assert envelope["state"].startswith("deflate;")  # compressed as the UI writes it
    for name in BUNDLE_SEARCH_FACETS + [k for k in BUNDLE_UI_STATE if k not in BUNDLE_NOT_SAVED]:
        if name not in ("compareRunCharts", "compareRunSections", "chartsSearchFilter"):  # UI default: unset
            assert name in state, name
    assert not set(state) & set(BUNDLE_NOT_SAVED)
    assert not set(state) - set(BUNDLE_SEARCH_FACETS) - set(BUNDLE_UI_STATE)  # nothing the UI would not read


def test_view_shows_variant_params_and_summary_metrics_grouped_by_variant_sorted_by_the_primary_metric():
    _, _, state = _view(primary_metric="val_loss", maximize=False)
    assert state["selectedColumns"] == ["params.`scconv.order`", "metrics.`val_loss`", "metrics.`summary.val_acc_best`",
                                        "metrics.`summary.val_loss_resid_sd`", "metrics.`peak_memory_mb`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_loss`", True)
    # The bundle's own sort-key pattern: ^(metrics|params)\.`(.*?)`$
    assert re.fullmatch(r"(metrics|params)\.`(.*?)`", state["orderByKey"])
    assert state["groupBy"] == {"aggregateFunction": "average",
                                "groupByKeys": [{"mode": "tag", "groupByData": VARIANT_TAG}]}
    assert state["runsHiddenMode"] == "SHOW_ALL"  # a study's 30 runs all reach the charts
    assert state["columnWidths"] == {"attributes.`Run Name`": view.RUN_NAME_WIDTH}


def test_view_state_can_be_plain_json():
    state = view.view_state(["a"], ["m"])
    envelope = json.dumps({"name": "x", "createdAt": 1, "state": view.encode_state(state, compress=False)})
    assert view.decode_view_tag(envelope)[1] == state
    with pytest.raises(ValueError):
        view.decode_view_tag(json.dumps({"name": "x", "state": "{}"}))  # no createdAt: the UI skips it


@pytest.mark.parametrize("version", ["3.14.9", "3.18.0", "4.0.0", "2.22.1", "not-a-version"])
def test_view_outside_the_checked_versions_is_not_written_and_says_why_in_one_line(version, caplog):
    with caplog.at_level(logging.INFO, logger="ablate.ui.view"):
        assert view.comparison_view_tags(version, ["scconv.order"], SUMMARY) == {}
    assert len(caplog.records) == 1 and version in caplog.records[0].getMessage()


def test_pinned_mlflow_is_in_the_checked_range():
    assert view.supported(mlflow.__version__)
    assert view.supported("3.17.2rc1") and view.supported("3.15.0")


def test_pinned_ui_bundle_reads_saved_views_as_written_here():
    """The installed UI's own code: tag prefix, URL parameter, envelope check, compression, the state keys it
    picks and the experiment kind; a changed MLflow fails here before a user sees an empty view."""
    files = sorted(BUNDLE.glob("*.js"))
    if not files:
        pytest.skip("this MLflow install has no UI bundle")
    js = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    assert f'"{view.SAVED_VIEW_TAG_PREFIX}"' in js and f'"{view.VIEW_QUERY_PARAM}"' in js
    assert "JSON.stringify({name:e,createdAt:i,updatedAt:a,state:t})" in js
    assert f'"{view.DEFLATE_PREFIX}"' in js and ".deflate(" in js
    assert json.dumps(BUNDLE_SEARCH_FACETS, separators=(",", ":")) in js
    assert json.dumps(BUNDLE_UI_STATE, separators=(",", ":")) in js
    assert json.dumps(BUNDLE_NOT_SAVED, separators=(",", ":")) in js
    assert f'CUSTOM_MODEL_DEVELOPMENT="{view.MODEL_TRAINING_KIND}"' in js
    assert f'MACHINE_LEARNING="{links.MODEL_TRAINING_WORKFLOW}"' in js and f'get("{links.WORKFLOW_QUERY_PARAM}")' in js
    assert f'"{palette.RUN_COLOR_TAG}"' in js
    # Column ids are built as group + ".`" + name + "`", the run name's from ATTRIBUTES and "Run Name".
    assert 'I=(e,t)=>e+".`"+t+"`"' in js and 'ATTRIBUTES:"attributes"' in js and 'RUN_NAME:"Run Name"' in js


def test_server_stores_the_view_and_serves_it_back(mlflow_server):
    """The real server over REST: the view, the experiment kind and the description come back unchanged."""
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"ui-view-{time.time_ns()}")
    tags = {**view.comparison_view_tags(mlflow.__version__, ["scconv.order"], SUMMARY), **view.experiment_kind_tags(),
            text.NOTE_TAG: text.experiment_description("demo", variant_params=["scconv.order"],
                                                       primary_metric="val_acc", view_name="Compare variants")}
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                                timeout=10) as response:
        served = {t["key"]: t["value"] for t in json.load(response)["experiment"]["tags"]}
    assert {k: served[k] for k in tags} == tags
    _, state = view.decode_view_tag(served["mlflow.sharedViewState." + view.SAVED_VIEW_ID])
    assert state["groupBy"]["groupByKeys"][0]["groupByData"] == VARIANT_TAG


def _rest(server: str, path: str, payload: dict | None = None) -> dict:
    """One call of the server's REST API: GET, or POST with a JSON body."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(f"{server}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


#: The smoke space cut to two trials of three tiny epochs: the smallest study with a report.
SERVED_STUDY = ["--n-trials", "2", "--set", "epochs=3", "--set", "max_steps_per_epoch=2", "--set", "image_size=16",
                "--set", "batch_size=32", "--set", "probe_size=16", "--quiet"]


def test_served_run_has_its_variants_name_colour_summaries_and_few_metrics(http_tracking):
    """One tiny training run on the real ``mlflow server``, read back over REST as the UI reads it."""
    from ablate.config import RunConfig
    from ablate.names import SUMMARY_METRICS
    from ablate.train import run_training

    cfg = RunConfig.from_dict({"scconv.order": "sru_cru", "epochs": 2, "image_size": 16, "batch_size": 32,
                               "max_steps_per_epoch": 2, "probe_size": 16, "experiment": f"ui-run-{time.time_ns()}",
                               "log_checkpoint": False})
    result = run_training(cfg, tracking_uri=http_tracking, progress=False)
    run = _rest(http_tracking, f"runs/get?run_id={result.run_id}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert run["info"]["run_name"] == "resnet20/sru_cru" and tags["mlflow.runColor"] == palette.ORDER_COLORS["sru_cru"]
    assert set(SUMMARY_METRICS) <= set(metrics) and len(metrics) <= 20, sorted(metrics)
    assert {"gate.sru.flip_share", "gate.cru.beta_entropy", "val_acc"} <= set(metrics)
    contexts = {i["tags"][0]["value"] for i in run["inputs"]["dataset_inputs"]}
    assert contexts == {"train", "val"}
    listed = {f["path"] for f in _rest(http_tracking, f"artifacts/list?run_id={result.run_id}")["files"]}
    assert {"gate_stats.csv", "gate_heatmap.html", "history.csv"} <= listed


@pytest.mark.slow
def test_served_study_reads_as_named_coloured_runs_with_summaries_a_view_and_a_linked_report(
        http_tracking, tmp_path, capsys):
    """A small study and its report on the real ``mlflow server`` (127.0.0.1), checked over its REST API as the UI
    reads them; ``ablate ui`` prints the same links."""
    from ablate.cli import main
    from ablate.names import SUMMARY_METRICS
    from analysis.report import make_report
    from analysis.runs import make_client

    server, name = http_tracking, f"ui-study-{time.time_ns()}"
    rc = main(["study", "--space", "smoke", "--study-name", name, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
               "--tracking-uri", server, *SERVED_STUDY])
    assert rc == 0
    make_report(make_client(server), name, tmp_path / "report")

    exp = _rest(server, f"experiments/get-by-name?experiment_name={name}")["experiment"]
    exp_tags = {t["key"]: t["value"] for t in exp["tags"]}
    _, state = view.decode_view_tag(exp_tags["mlflow.sharedViewState." + view.SAVED_VIEW_ID])
    assert {f"metrics.`{m}`" for m in SUMMARY_METRICS} <= set(state["selectedColumns"])
    assert "params.`scconv.order`" in state["selectedColumns"]
    assert exp_tags["mlflow.experimentKind"] == view.MODEL_TRAINING_KIND
    found = _rest(server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_role: dict[str, list] = {}
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        by_role.setdefault(tags["ablate.role"], []).append((run, tags))
    (parent, parent_tags), = by_role["study"]
    children = by_role["run"]
    assert len(children) == 2
    for run, tags in children:
        order = next(p["value"] for p in run["data"]["params"] if p["key"] == "scconv.order")
        assert run["info"]["run_name"] == order == tags["ablate.variant"]  # the variant, whole
        assert tags["mlflow.runColor"] == palette.variant_color(order)
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert set(SUMMARY_METRICS) <= set(metrics)
        assert metrics["summary.best_val_acc"] >= metrics["summary.final_val_acc"] >= 0.0
        assert len(metrics) <= 20, sorted(metrics)
        assert not any(k.startswith(("sru/", "cru/", "sens/out/", "sens/loss/")) for k in metrics)
    report = links.artifact_url(server, exp["experiment_id"], parent["info"]["run_id"], "report/index.html")
    note = parent_tags[text.NOTE_TAG]
    assert f"]({report})" in note
    assert "report.best_val_acc" in {m["key"] for m in parent["data"]["metrics"]}
    assert parent_tags["ablate.report.best_variant"] in {tags["ablate.variant"] for _, tags in children}
    with urllib.request.urlopen(f"{server}/get-artifact?path=report/index.html&run_uuid={parent['info']['run_id']}",
                                timeout=30) as response:  # what the note's link opens
        assert response.status == 200 and b"plotly" in response.read()

    capsys.readouterr()
    assert main(["ui", "--tracking-uri", server]) == 0
    out = capsys.readouterr().out
    assert f"study {name}:" in out and f"report:  {report}" in out
    assert links.runs_url(server, exp["experiment_id"], view.SAVED_VIEW_ID) in out


# -- colours, names, notes, links ---------------------------------------------------------------------------


def test_every_order_has_its_own_fixed_colour_the_baseline_grey():
    colors = palette.variant_colors(reversed(ORDERS))
    assert len(set(colors.values())) == len(ORDERS)
    assert colors["none"] == palette.BASELINE_COLOR
    assert palette.variant_color("sru_cru") == colors["sru_cru"] == palette.variant_color("resnet20/sru_cru")
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in palette.PALETTE)  # what the UI's colour picker writes


def test_other_labels_take_the_palette_in_natural_order_whatever_order_they_come_in():
    labels = ["1", "0.5", "10", "0.25"]
    colors = palette.variant_colors(labels)
    assert palette.canonical_order(labels) == ["0.25", "0.5", "1", "10"]
    assert [colors[x] for x in ["0.25", "0.5", "1", "10"]] == list(palette.PALETTE[:4])
    assert palette.variant_colors(reversed(labels)) == colors
    assert len(set(palette.variant_colors([f"v{i}" for i in range(len(palette.PALETTE))]).values())) == len(palette.PALETTE)


def test_palette_starts_with_plotlys_d3_less_its_grey():
    import plotly.colors

    d3 = [c.lower() for c in plotly.colors.qualitative.D3]
    assert list(palette.PALETTE[:9]) == [c for c in d3 if c != palette.BASELINE_COLOR]


def test_run_name_says_the_variant_and_seed():
    assert text.run_name("sru_cru", 3) == "sru_cru-seed3"
    assert text.run_name("0.5,sum", None) == "0.5,sum"


def test_parent_note_links_the_report_or_says_how_to_write_it():
    note = text.parent_note("http://h/#/experiments/1/runs/p/artifacts/report/index.html", study="demo",
                            view_url="http://h/#/v", headline={"best variant": "sru_cru"})
    assert "[demo report](http://h/#/experiments/1/runs/p/artifacts/report/index.html)" in note
    assert "(http://h/#/v)" in note and "| best variant | sru_cru |" in note
    missing = text.parent_note(None, study="demo", report_command="analysis report --experiment demo")
    assert "not written yet: `analysis report --experiment demo`" in missing and "](" not in missing


def test_links_open_the_runs_page_in_model_training_mode_with_the_view_the_compare_page_and_the_report():
    got = links.ui_links("sqlite:///x.db", "7", ["r1", "r2"], "p9", port=5001, view_id=view.SAVED_VIEW_ID)
    runs = urlparse(got.runs.replace("/#/", "/"))
    assert got.runs.startswith("http://127.0.0.1:5001/#/experiments/7/runs?")
    assert parse_qs(runs.query) == {"workflowType": ["machine_learning"], "viewStateShareKey": [view.SAVED_VIEW_ID]}
    compare = parse_qs(urlparse(got.compare.replace("/#/", "/")).query)
    assert json.loads(compare["runs"][0]) == ["r1", "r2"] and json.loads(compare["experiments"][0]) == ["7"]
    assert got.report == "http://127.0.0.1:5001/#/experiments/7/runs/p9/artifacts/report/index.html"
    served = links.ui_links("https://alice:secret@mlflow.example:8443/", "7", [], None)
    assert served.runs.startswith("https://mlflow.example:8443/#/") and "secret" not in "".join(served[:2])
    assert served.report is None and unquote(served.compare).endswith("runs=[]&experiments=[\"7\"]")


# -- gate aggregates ----------------------------------------------------------------------------------------


def _stats(**per_layer) -> dict[GateKey, float]:
    out = {}
    for name, values in per_layer.items():
        kind, stat = name.split("__")
        out.update({GateKey(kind, f"layer{i}.conv", stat): v for i, v in enumerate(values)})
    return out


def test_gate_aggregates_are_means_over_layers_of_the_finite_values():
    stats = _stats(sru__flip_share=[0.1, 0.3], sru__informative_share=[0.5, float("nan"), 0.7],
                   sru__margin_share=[float("nan")], cru__beta_entropy=[0.6, 0.2, 0.4], cru__beta_mean=[0.5])
    got = gates.gate_aggregates(stats, "soft")
    assert got["gate.sru.flip_share"] == pytest.approx(0.2)
    assert got["gate.sru.informative_share"] == pytest.approx(0.6)
    assert math.isnan(got["gate.sru.margin_share"])
    assert got["gate.cru.beta_entropy"] == pytest.approx(0.4)
    assert "gate.cru.beta_mean" not in got  # not among the default statistics
    assert gates.gate_aggregates(stats, "soft", stats=None)["gate.cru.beta_mean"] == 0.5


def test_gate_aggregates_skip_gamma_under_the_binary_gate_only():
    stats = _stats(sru__gamma_drift=[0.0, 0.0], sru__gamma_min=[1.0, 1.0], sru__flip_share=[0.2, 0.4])
    assert set(gates.gate_aggregates(stats, "binary", stats=None)) == {"gate.sru.flip_share"}
    for mode in ("soft", "ste", "reference"):
        assert "gate.sru.gamma_drift" in gates.gate_aggregates(stats, mode)
    assert gates.gate_aggregates({}, "binary") == {}


@pytest.mark.parametrize("impl", ["efficient", "reference"])
@pytest.mark.parametrize("order", ["sru_cru", "parallel"])
def test_binary_gate_leaves_groupnorm_gamma_and_beta_untouched_by_training(impl, order):
    """Why CONSTANT_STATS holds: SGD with momentum and weight decay, as the trainer runs it, on inputs large enough
    for the efficient implementation to recompute in backward, moves gamma under ste but never under binary."""
    moved = {}
    for mode in ("binary", "ste"):
        torch.manual_seed(0)
        module = SCConv(16, 16, 1, SCConvConfig(order=order, gate_mode=mode, impl=impl))
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        before = [module.sru.gn.weight.detach().clone(), module.sru.gn.bias.detach().clone()]
        x = torch.randn(16, 16, 32, 32)  # 1 MiB: the efficient SCConv recomputes its body
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            module(x).square().mean().backward()
            optimizer.step()
        moved[mode] = not all(torch.equal(b, p.detach()) for b, p in zip(before, (module.sru.gn.weight,
                                                                                   module.sru.gn.bias)))
    assert moved == {"binary": False, "ste": True}


# -- system metrics, dataset inputs, source tags -------------------------------------------------------------


def _run(uri: str) -> tuple[MlflowClient, str]:
    client = track.client(uri)
    experiment_id = track.ensure_experiment(client, "ui")
    return client, client.create_run(experiment_id, tags=provenance.source_tags("ablate study")).info.run_id


def test_system_metrics_sample_cpu_and_memory_but_not_disk_or_network(tracking_uri, monkeypatch):
    monkeypatch.delenv(system.MLFLOW_SWITCH, raising=False)
    client, run_id = _run(tracking_uri)
    monitor = system.start_system_metrics(run_id, client.tracking_uri, torch.device("cpu"), interval_s=0.1)
    assert monitor is not None
    time.sleep(0.5)
    system.stop_system_metrics(monitor)
    keys = set(client.get_run(run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    assert not [k for k in keys if "disk" in k or "network" in k or "gpu" in k]


def test_system_metrics_off_by_config_or_by_mlflows_switch(monkeypatch):
    monkeypatch.delenv(system.MLFLOW_SWITCH, raising=False)
    assert system.system_metrics_enabled(True) and not system.system_metrics_enabled(False)
    monkeypatch.setenv(system.MLFLOW_SWITCH, "false")
    assert not system.system_metrics_enabled(True)
    assert system.start_system_metrics("no-such-run", "sqlite:///unused.db") is None


def test_dataset_inputs_have_train_and_val_contexts_and_sizes(tracking_uri):
    client, run_id = _run(tracking_uri)
    digest = provenance.config_digest({"dataset": "digits", "image_size": 8, "label_noise": 0.2})
    provenance.log_dataset_inputs(client, run_id, "digits", digest, n_train=500, n_val=360)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i for i in inputs}
    assert set(by_context) == {"train", "val"} and {i.tags[0].key for i in inputs} == {"mlflow.data.context"}
    assert {i.dataset.name for i in inputs} == {"digits"}
    assert json.loads(by_context["train"].dataset.profile)["num_rows"] == 500
    assert json.loads(by_context["val"].dataset.profile) == {"num_rows": 360, "digest": digest, "split": "val"}
    assert by_context["train"].dataset.digest != by_context["val"].dataset.digest


def test_source_tags_name_the_entry_point_and_the_checkout(tracking_uri, monkeypatch):
    client, run_id = _run(tracking_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == "ablate study" and tags["mlflow.source.type"] == "LOCAL"
    if track.git_commit() != "unknown":
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
        assert tags["mlflow.source.git.dirty"] in ("true", "false")
    monkeypatch.setattr(track, "git_commit", lambda: "unknown")  # outside a checkout
    provenance._git_tags.cache_clear()
    try:
        assert provenance.source_tags() == {"mlflow.source.name": "ablate", "mlflow.source.type": "LOCAL"}
    finally:
        provenance._git_tags.cache_clear()


def test_gpu_system_metrics_sample_only_the_runs_own_gpu(monkeypatch):
    """NVML numbers every GPU of the machine; the run's CUDA device is found by its UUID (NVML writes it
    ``GPU-<uuid>``), so a worker pinned to one GPU logs that GPU as gpu_0 and no other."""
    import pynvml
    from mlflow.system_metrics.metrics import gpu_monitor

    class FakeMonitor:
        def __init__(self):
            self.gpu_handles, self.num_gpus = ["h0", "h1", "h2"], 3

    asked = []
    monkeypatch.setattr(gpu_monitor, "GPUMonitor", FakeMonitor)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda uuid: asked.append(uuid) or "h2")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: type("Props", (), {"uuid": f"uuid-of-{index}"})())
    monitor = system._device_gpu_monitor(torch.device("cuda", 2))
    assert asked == ["GPU-uuid-of-2"] and (monitor.gpu_handles, monitor.num_gpus) == (["h2"], 1)
    assert system._device_gpu_monitor(torch.device("cpu")) is None


# -- the report on the study run, ablate ui's links, the gate heatmap ---------------------------------------


def test_report_puts_its_link_best_variant_and_primary_ratios_on_the_study_run(store, tmp_path):
    from test_runs import log_study

    from analysis.report import build_report_data, log_report
    from analysis.report.log import metric_key
    from analysis.runs import make_client

    log_study(store, predictions=False)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_text("<html></html>")  # the page's content is test_report's business
    data = build_report_data(make_client(store), "synthetic")
    run_id = log_report(make_client(store), data, tmp_path / "r")
    client = MlflowClient(store)
    parent = client.get_run(run_id)
    assert parent.data.tags["ablate.role"] == "study"
    exp_id = parent.info.experiment_id
    note = parent.data.tags[text.NOTE_TAG]
    assert f"](http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}/artifacts/report/index.html)" in note
    finals = {}
    for run in client.search_runs([exp_id], "tags.`ablate.role` = 'run'"):
        finals.setdefault(run.data.params["scconv.order"], []).append(run.data.metrics["val_acc"])
    best = max(finals, key=lambda v: sum(finals[v]) / len(finals[v]))
    assert parent.data.tags["ablate.report.best_variant"] == best
    assert parent.data.metrics["report.best_val_acc"] == pytest.approx(sum(finals[best]) / len(finals[best]))
    # sru_cru is the noisy variant of the synthetic study: its ratio is the large one, and it is in the note
    ratios = {v: parent.data.metrics[f"report.val_loss.resid_sd_ratio.{v}"] for v in ("sru", "sru_cru")}
    assert ratios["sru_cru"] > max(1.5, ratios["sru"])
    primary = data.comparisons[data.comparisons["metric"] == "val_loss.resid_sd"].set_index("variant")["ratio"]
    assert ratios == pytest.approx(primary.to_dict())
    assert "`sru_cru`: val_loss.resid_sd / `none`" in note
    assert metric_key("0.5,sum") == "0.5_sum"


def test_ui_links_of_each_study_say_where_the_report_is_or_how_to_write_it(store):
    from test_runs import log_study

    log_study(store, predictions=False)
    client = MlflowClient(store)
    (found,) = links.study_links(client, store, port=5001)
    assert found.study == "synthetic" and not found.has_report
    assert found.links.runs.startswith("http://127.0.0.1:5001/#/experiments/")
    lines = links.format_study_links([found])
    assert lines[0] == "study synthetic:" and lines[-1] == "  report:  not written yet: analysis report --experiment synthetic"
    assert links.study_links(client, store, experiment="no-such") == []


def test_gate_heatmap_has_one_panel_per_aggregated_statistic_layers_by_epochs():
    rows = [(e, layer, "sru", stat, 0.1 * e + i) for e in range(3) for i, layer in enumerate(["l1", "l2"])
            for stat in ("flip_share", "gamma_drift", "near_threshold_share")]
    rows += [(0, "l1", "cru", "beta_entropy", 0.6)]
    info = gates.gate_heatmap_info(rows, "binary")
    names = [p[0] for p in info.panels]
    assert names == ["gate.sru.flip_share", "gate.cru.beta_entropy"]  # gamma: constant under binary; not aggregated
    _, layers, epochs, z = info.panels[0]
    assert layers == ("l1", "l2") and epochs == (0, 1, 2) and z[1] == pytest.approx((1.0, 1.1, 1.2))
    assert [p[0] for p in gates.gate_heatmap_info(rows, "soft").panels][1] == "gate.sru.gamma_drift"
    fig = gates.gate_heatmap_plot(info)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]

