"""Model complexity: parameter counts and MACs of a backbone with an SCConv variant.

MACs are the multiply-accumulates that ``torch.utils.flop_counter.FlopCounterMode`` counts
(convolutions, linear layers and matrix products), i.e. its FLOPs divided by 2. Normalisation,
activations, pooling, softmax and element-wise products (the SRU gate, the CRU fuse) are not
counted, as in the MAC figures papers report. ``saved_activation_bytes`` measures what a forward keeps for its
backward (the benchmark's activation memory); ``count_ops`` counts the operations a step dispatches, which on
a GPU are its kernel launches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ablate import table
from ablate.config import ModelConfig
from ablate.errors import check, is_int
from ablate.models import build_model
from ablate.nn.efficient import recomputed_placeholders


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not); buffers such as BN statistics are not counted."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """MACs of one eval-mode, no-grad forward of a single ``in_channels x image_size x image_size`` image."""
    _check_image_size(image_size)
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    # A fixed generator: the count must not depend on, or disturb, the global RNG.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_channels, image_size, image_size, generator=generator).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def profile_rows(model_cfg: ModelConfig, image_size: int, compare: bool) -> list[dict]:
    """One row per model (resolved config, params, MACs); ``compare`` puts the order "none" baseline first
    and adds ``params_ratio``/``macs_ratio`` against it to every row."""
    _check_image_size(image_size)
    cfg = model_cfg.resolved()
    configs = [cfg]
    if compare:
        baseline = replace(cfg, scconv=replace(cfg.scconv, order="none"))
        configs = [baseline] if cfg.scconv.order == "none" else [baseline, cfg]
    rows = [_profile_row(c, image_size) for c in configs]
    if compare:
        base = rows[0]
        for row in rows:
            row["params_ratio"] = round(row["params"] / base["params"], 4)
            row["macs_ratio"] = round(row["macs"] / base["macs"], 4)
    return rows


def _check_image_size(image_size: int) -> None:
    check("image_size", image_size, is_int(image_size) and image_size >= 8, "an integer >= 8")


def _profile_row(cfg: ModelConfig, image_size: int) -> dict:
    # Seeded so that building for a profile leaves the caller's RNG as it was.
    model = build_model(cfg, seed=0)
    return {
        "backbone": cfg.backbone,
        "order": cfg.scconv.order,
        "preset": cfg.scconv.preset,
        "placement": cfg.placement,
        "num_classes": cfg.num_classes,
        "image_size": image_size,
        "params": count_params(model),
        "macs": count_macs(model, image_size),
    }


def format_table(rows: list[dict]) -> str:
    """An aligned text table: params in M, MACs in G (or M below 1 G), and the ratios when present."""
    headers = ["backbone", "order", "preset", "placement", "classes", "image", "params", "MACs"]
    with_ratios = bool(rows) and "params_ratio" in rows[0]
    if with_ratios:
        headers += ["params x", "MACs x"]
    body = [_format_row(row, with_ratios) for row in rows]
    return table.format_table(headers, body, right_from=4)  # "classes" on: numbers, right-aligned


def _format_row(row: dict, with_ratios: bool) -> list[str]:
    cells = [
        row["backbone"], row["order"], row["preset"], row["placement"], str(row["num_classes"]),
        str(row["image_size"]), f"{row['params'] / 1e6:.3f}M", _format_macs(row["macs"]),
    ]
    if with_ratios:
        cells += [f"{row['params_ratio']:.4f}", f"{row['macs_ratio']:.4f}"]
    return cells


def _format_macs(macs: int) -> str:
    return f"{macs / 1e9:.3f}G" if macs >= 1e9 else f"{macs / 1e6:.2f}M"


def saved_activation_bytes(output: torch.Tensor, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that autograd keeps for the backward of ``output``: every tensor saved by a node of its graph,
    counted once per storage (a view costs its whole storage, two views of one storage cost it once), less
    the storages of ``exclude`` (the parameters, resident anyway).

    The activation memory of a training step, apart from the runtime, the model and the optimizer: the
    same measure in eager mode, for the custom autograd Functions (their ``saved_tensors``) and for a
    ``torch.compile``d model (one node that saves what the compiler chose to keep).
    """
    with recomputed_placeholders():  # what backward would recompute is not kept: it reads as a meta tensor
        seen = {t.untyped_storage().data_ptr() for t in exclude}
        # A node's Python object lives only while referenced (torch makes one on access, and a new one once it
        # died), so a dropped node's id can come back as another node's: keep every visited node alive.
        total, visited, stack = 0, {}, [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited[id(node)] = node
            for t in _saved_tensors(node):
                if t.device.type == "meta":  # a placeholder of what backward recomputes
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            stack.extend(fn for fn, _ in node.next_functions)
        return total


def _saved_tensors(node) -> list[torch.Tensor]:
    """The tensors one autograd node saved: ``saved_tensors`` of a custom Function, ``_saved_*`` of built-ins."""
    values = []
    try:
        values.extend(getattr(node, "saved_tensors", ()) or ())
    except RuntimeError:  # already freed by a backward
        pass
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                value = getattr(node, name)
            except RuntimeError:
                continue
            values.extend(value if isinstance(value, (tuple, list)) else (value,))
    return [v for v in values if isinstance(v, torch.Tensor) and v.device.type != "meta"]


#: Operators that compute nothing: allocation without initialisation, dtype arithmetic, and the views that
#: their schema does not mark as views (the rest are told apart by it).
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "promote_types",
                        "result_type", "lift_fresh", "_unsafe_view"})


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> Counter:
    """The ATen operators that ``run()`` dispatches below autograd, by name, forward and backward alike; views
    and allocations left out. Each launches at least one kernel on a GPU, so where a step is many small
    operations this count, more than its MACs, sets its time. Deterministic: the same code counts the same."""
    counter = _OpCounter()
    with counter:
        run()
    return counter.counts
