"""Sensitivity of a trained model's SRU gates and layer attributions to small input perturbations (captum).

For a run's final checkpoint (docs/tracking.md: ``checkpoint/checkpoint.pt``) and a few fixed validation
images (the run's own gate-probe images, ``ablate.data.probe_batch``):

- ``mask_sensitivity``: ``captum.metrics.sensitivity_max`` of the SRU masks (``R > t``, every SRU
  layer concatenated): the largest ``||m(x + d) - m(x)|| / ||m(x)||`` over ``n_perturb`` draws of
  ``d`` uniform in the L-inf ball of ``radius`` (normalised input units), mean over images. For a
  binary mask this is sqrt(flipped bits / informative bits).
- ``attribution_sensitivity``: the same for ``LayerGradCam`` attributions (target: the true label)
  at one layer path that every compared model has (the last SCConv of the variant; the 3x3 conv it
  replaced in the baseline), so baseline and variant are measured at the same place.
- ``flip_share``: share of all SRU mask bits that flip under a perturbation, mean over the draws
  and images (``flip_share_by_layer`` per layer).

Every model of one comparison sees the same images and the same perturbations (one seeded
generator per model). A model without SRU gets NaN for the mask measures.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ablate.errors import ConfigError
from ablate.names import CHECKPOINT_DIR
from ablate.train.checkpoint import CHECKPOINT_ARTIFACT
from analysis.gates import probe_masks

DEFAULT_IMAGES = 8
DEFAULT_RADIUS = 0.02
DEFAULT_PERTURB = 4


@dataclass
class Sensitivity:
    """Sensitivity measures of one model on one set of images."""

    label: str
    layer: str
    n_images: int
    radius: float
    n_perturb: int
    mask_sensitivity: float
    attribution_sensitivity: float
    flip_share: float
    flip_share_by_layer: dict[str, float] = field(default_factory=dict)
    run_id: str = ""

    def row(self) -> dict:
        """Flat dict for a table (per-layer flip shares as ``flip_share.<layer>``)."""
        out = {k: v for k, v in self.__dict__.items() if k != "flip_share_by_layer"}
        out.update({f"flip_share.{k}": v for k, v in self.flip_share_by_layer.items()})
        return out


def _perturb_func(seed: int):
    """captum perturb_func drawing uniform L-inf noise from its own seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def perturb(inputs, radius):
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        noise = (torch.rand(x.shape, generator=gen) * 2.0 - 1.0) * radius
        return x + noise.to(x.device, x.dtype)

    return perturb


def _first(inputs) -> torch.Tensor:
    return inputs[0] if isinstance(inputs, tuple) else inputs


def _mask_explanation(model: nn.Module):
    """inputs -> tuple of float SRU masks per layer (captum explanation_func)."""
    def explain(inputs):
        return tuple(m.float() for m in probe_masks(model, _first(inputs)).values())

    return explain


def _gradcam_explanation(model: nn.Module, layer: str):
    from captum.attr import LayerGradCam

    cam = LayerGradCam(model, dict(model.named_modules())[layer])

    def explain(inputs, target=None):
        # a tuple: captum's sensitivity_max iterates the clean explanation as a tuple of tensors
        return (cam.attribute(_first(inputs), target=target),)

    return explain


def common_layer(models: Sequence[nn.Module]) -> str:
    """The last SCConv layer path (of any model) that every model has, else the last common 3x3 conv."""
    from ablate.nn import iter_gates

    names = [dict(m.named_modules()) for m in models]
    gated = [layer for m in models for layer, _, _ in iter_gates(m)]
    for layer in reversed(gated):
        if all(layer in n for n in names):
            return layer
    convs = [n for n, mod in models[0].named_modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    for layer in reversed(convs):
        if all(layer in n for n in names):
            return layer
    raise ConfigError("models have no common 3x3 conv layer; accepted: checkpoints of one backbone")


def flip_counts(model: nn.Module, images: torch.Tensor, radius: float, n_perturb: int,
                seed: int) -> dict[str, tuple[int, int]]:
    """Per SRU layer: (mask bits that flip between each image and its perturbed copies, bits compared)."""
    clean = probe_masks(model, images)
    if not clean:
        return {}
    noisy = probe_masks(model, _perturb_func(seed)(images.repeat_interleave(n_perturb, dim=0), radius))
    return {layer: (int((clean[layer].repeat_interleave(n_perturb, dim=0) != noisy[layer]).sum()),
                    noisy[layer].numel()) for layer in clean}


def model_sensitivity(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str, label: str = "",
                      radius: float = DEFAULT_RADIUS, n_perturb: int = DEFAULT_PERTURB, seed: int = 0) -> Sensitivity:
    """Mask and GradCAM sensitivity (captum sensitivity_max) and gate flip share of one model."""
    from captum.metrics import sensitivity_max

    model.eval()
    counts = flip_counts(model, images, radius, n_perturb, seed)
    mask_value = flip = float("nan")
    if counts:
        mask_sens = sensitivity_max(_mask_explanation(model), images, perturb_func=_perturb_func(seed),
                                    perturb_radius=radius, n_perturb_samples=n_perturb)
        mask_value = float(mask_sens.mean())
        flip = sum(f for f, _ in counts.values()) / sum(n for _, n in counts.values())
    attr_sens = sensitivity_max(_gradcam_explanation(model, layer), images, perturb_func=_perturb_func(seed),
                                perturb_radius=radius, n_perturb_samples=n_perturb, target=labels)
    return Sensitivity(label=label, layer=layer, n_images=len(images), radius=radius, n_perturb=n_perturb,
                       mask_sensitivity=mask_value, attribution_sensitivity=float(attr_sens.mean()),
                       flip_share=flip, flip_share_by_layer={k: f / n for k, (f, n) in counts.items()})


def compare_models(models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor,
                   radius: float = DEFAULT_RADIUS, n_perturb: int = DEFAULT_PERTURB, seed: int = 0) -> list[Sensitivity]:
    """:func:`model_sensitivity` of each model on the same images, perturbations and layer path."""
    layer = common_layer(list(models.values()))
    return [model_sensitivity(m, images, labels, layer, label, radius, n_perturb, seed) for label, m in models.items()]


# -- from tracked runs -------------------------------------------------------------------------


def has_checkpoint(client, run_id: str) -> bool:
    """True when the run logged ``checkpoint/checkpoint.pt``."""
    return CHECKPOINT_ARTIFACT in {f.path for f in client.list_artifacts(run_id, CHECKPOINT_DIR)}


def load_run_model(client, run_id: str, dst: Path):
    """(model, RunConfig) from a run's ``checkpoint/checkpoint.pt``; ConfigError when the run or file is missing."""
    from mlflow.exceptions import MlflowException

    from ablate.train.checkpoint import load_model

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--run-id={run_id!r} is not a run of this tracking store; accepted: an MLflow run id") from None
    if not has_checkpoint(client, run_id):
        raise ConfigError(f"--run-id={run_id!r} has no {CHECKPOINT_ARTIFACT} artifact (trained with "
                          "log_checkpoint=false?); accepted: a run that logged its final checkpoint")
    path = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst))
    # weights_only: a crafted checkpoint is refused, never run; one of another config than the run's is refused too.
    return load_model(path, source=f"run {run_id}", params=run.data.params)


def probe_images(cfg, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_images`` gate-probe validation images of a run's dataset (the same on every call)."""
    from ablate.data import build_datasets, check_available, probe_batch

    check_available(cfg.data)
    return probe_batch(build_datasets(cfg.data), n_images)


def _data_key(cfg) -> tuple:
    return cfg.data.dataset, cfg.data.image_size, cfg.data.data_root


def run_sensitivity(client, run_ids: dict[str, str], n_images: int = DEFAULT_IMAGES, radius: float = DEFAULT_RADIUS,
                    n_perturb: int = DEFAULT_PERTURB, seed: int = 0) -> pd.DataFrame:
    """Sensitivity table (one row per run) for ``label -> run_id``, all on the first run's images.

    Runs of different datasets or image sizes cannot share images: ConfigError.
    """
    with tempfile.TemporaryDirectory(prefix="analysis-ckpt-") as tmp:
        loaded = {label: load_run_model(client, rid, Path(tmp) / rid) for label, rid in run_ids.items()}
    configs = {label: cfg.resolved() for label, (_, cfg) in loaded.items()}
    keys = {_data_key(c) for c in configs.values()}
    if len(keys) > 1:
        raise ConfigError(f"runs {', '.join(run_ids.values())} use different data {sorted(keys)}; "
                          "accepted: runs of one dataset and image size")
    images, labels = probe_images(next(iter(configs.values())), n_images)
    results = compare_models({label: m for label, (m, _) in loaded.items()}, images, labels, radius, n_perturb, seed)
    for res in results:
        res.run_id = run_ids[res.label]
    return pd.DataFrame([r.row() for r in results])


def sensitivity_ratios(table: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each row's attribution sensitivity over the baseline row's (``attribution_ratio``)."""
    base = table.loc[table["label"] == baseline, "attribution_sensitivity"]
    ref = float(base.iloc[0]) if len(base) else float("nan")
    return table.assign(attribution_ratio=table["attribution_sensitivity"] / ref if ref else np.nan)
