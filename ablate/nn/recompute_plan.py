"""What efficient SCConvs recompute in backward, chosen from measured cost (``scconv.recompute = "auto"``).

An efficient SCConv with a CRU either keeps its body's activations for the backward pass, or keeps only
its input and reruns the body there, or (order ``sru_cru``) reruns only the SRU and the CRU's squeezes
there, so that the largest of its activations, the SRU's output and the squeezed inputs, are not kept
(``RECOMPUTE_MODES``: keep, sru, body). Recomputing frees memory and costs time, and how much of each
depends on the layer's size and on the device: on a 2-core CPU DenseNet-121's 28x28 layers free 1.4 MiB
per ms of rerun body and its 3x3 layers 0.1 MiB (benchmarks/README.md). So the plan measures rather than
guesses, on a copy of the model and an input of the training batch's shape:

- the whole forward + backward with every planned layer keeping: its time T and the bytes M that
  autograd saves for it (``ablate.profile.saved_activation_bytes``);
- forward + backward of each distinct layer (same configuration, channels, stride and input share one
  measurement) in each of its modes: in mode k layer i frees dM_ik bytes and adds dT_ik ms against keeping.

It then chooses the modes that minimise the step's memory-time product (M - sum dM) * (T + sum dT). Each
layer's modes become steps along their upper hull in (added ms, freed bytes): keep -> sru -> body where the
SRU step frees more per ms, else keep -> body directly. All layers' steps are ordered by freed bytes per
added ms, and the best prefix of that order is taken. Memory and time weigh alike in relative terms,
whatever the units or the device: alone, a layer that frees a share m of the memory for a share t more
time pays when (1 - m)(1 + t) < 1. A mode that frees memory without costing time is always taken (the
one freeing most), one that frees nothing never; equal layers go all or none (the product is concave in
their number).

Nothing of the model changes but ``SCConv.planned_recompute``: the copy takes the measurements, inside
``torch.random.fork_rng``, so the model's weights, gradients, BatchNorm statistics and every random
stream are as they were. Every mode gives the same outputs and gradients bit for bit, so a plan changes
memory and time, never a result (tests/test_recompute_plan.py).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ablate.nn.convert import set_keep_stats
from ablate.nn.scconv import SCConv
from ablate.profile import saved_activation_bytes

__all__ = ["LayerCost", "RecomputePlan", "choose_recompute", "plan_recompute"]


@dataclass(frozen=True)
class LayerCost:
    """One planned SCConv: its measured cost keeping and recomputing, and the choice."""

    name: str  #: module path, e.g. ``features.denseblock1.denselayer1.conv2``
    input_shape: tuple[int, ...]
    keep_ms: float  #: forward + backward of the layer alone, keeping its activations
    recompute_ms: float  #: the same, recomputing its body in backward
    keep_bytes: int  #: activation bytes the layer saves for backward when keeping
    recompute_bytes: int  #: the same when recomputing its body (its input)
    sru_ms: float | None  #: forward + backward recomputing the SRU and squeezes only (order sru_cru; else None)
    sru_bytes: int | None  #: activation bytes saved then
    recompute: str  #: the plan's choice, one of ``RECOMPUTE_MODES``

    def cost(self, mode: str) -> tuple[float, int]:
        """(ms, saved bytes) of the layer in ``mode``."""
        return {"keep": (self.keep_ms, self.keep_bytes), "body": (self.recompute_ms, self.recompute_bytes),
                "sru": (self.sru_ms, self.sru_bytes)}[mode]


@dataclass(frozen=True)
class RecomputePlan:
    """The plan of one model: the whole step measured with every planned layer keeping, and each layer."""

    step_ms: float
    step_bytes: int
    layers: tuple[LayerCost, ...]
    seconds: float  #: what planning took

    @property
    def recomputed(self) -> int:
        """Layers that recompute their body."""
        return sum(layer.recompute == "body" for layer in self.layers)

    @property
    def sru_recomputed(self) -> int:
        """Layers that recompute only their SRU and squeezes."""
        return sum(layer.recompute == "sru" for layer in self.layers)

    @property
    def tally(self) -> str:
        """``body+sru/planned`` layer counts, e.g. ``6+36/58`` (``ablate bench``'s ``recomputed`` column)."""
        return f"{self.recomputed}+{self.sru_recomputed}/{len(self.layers)}"

    @property
    def freed_bytes(self) -> int:
        """Saved-activation bytes the chosen recomputes free, from the per-layer measurements."""
        return sum(layer.keep_bytes - layer.cost(layer.recompute)[1] for layer in self.layers)

    @property
    def added_ms(self) -> float:
        """Milliseconds per step the chosen recomputes add, from the per-layer measurements."""
        return sum(layer.cost(layer.recompute)[0] - layer.keep_ms for layer in self.layers)

    def summary(self) -> str:
        """One line, e.g. ``6 of 58 SCConvs recompute their body in backward and 36 their SRU and squeezes: -96
        MiB of 606 MiB saved, +12 ms of 830 ms``."""
        return (f"{self.recomputed} of {len(self.layers)} SCConvs recompute their body in backward and "
                f"{self.sru_recomputed} their SRU and squeezes: "
                f"-{self.freed_bytes / 2**20:.0f} MiB of {self.step_bytes / 2**20:.0f} MiB saved activations, "
                f"{self.added_ms:+.0f} ms of a {self.step_ms:.0f} ms forward + backward "
                f"(planned in {self.seconds:.1f} s)")

    def to_dict(self) -> dict:
        return {"step_ms": self.step_ms, "step_bytes": self.step_bytes, "seconds": self.seconds,
                "recomputed": self.recomputed, "sru_recomputed": self.sru_recomputed,
                "freed_bytes": self.freed_bytes, "added_ms": self.added_ms,
                "layers": [asdict(layer) for layer in self.layers]}


def choose_recompute(step_ms: float, step_bytes: float,
                     layers: Sequence[Mapping[str, tuple[float, float]]]) -> list[str]:
    """What each layer recomputes (one of ``RECOMPUTE_MODES``), given the step's time and saved bytes with every
    layer keeping and, per layer, each of its other modes' (freed bytes, added ms) against keeping: the choice
    that minimises the memory-time product.

    A mode that frees memory at no added time is taken outright (of those, the one freeing most); a mode
    that frees nothing never is. The other modes become steps along each layer's upper hull in (added ms,
    freed bytes), and all layers' steps are taken in order of freed bytes per added ms (ties in model order,
    a layer's own steps in hull order) up to the prefix with the smallest product (ties: the shorter one).
    """
    chosen = ["keep"] * len(layers)
    memory, ms = float(step_bytes), float(step_ms)
    steps: list[tuple[float, float, int, str]] = []  # (freed, added, layer, mode it moves the layer to)
    for i, modes in enumerate(layers):
        options = [(float(freed), float(added), mode) for mode, (freed, added) in modes.items() if freed > 0]
        current = max((o for o in options if o[1] <= 0), key=lambda o: (o[0], -o[1]), default=(0.0, 0.0, "keep"))
        chosen[i] = current[2]
        memory, ms = memory - current[0], ms + current[1]
        ahead = [o for o in options if o[0] > current[0] and o[1] > current[1]]
        while ahead:  # the upper hull: the next mode freeing the most per added ms from the current one
            base = current
            current = max(ahead, key=lambda o: ((o[0] - base[0]) / (o[1] - base[1]), -o[1]))
            steps.append((current[0] - base[0], current[1] - base[1], i, current[2]))
            ahead = [o for o in ahead if o[0] > current[0] and o[1] > current[1]]
    order = sorted(range(len(steps)), key=lambda k: (-steps[k][0] / steps[k][1], steps[k][2], k))
    # Per-layer measurements may claim more than the whole step saves: never let the memory reach zero.
    floor = 1e-9 * max(float(step_bytes), 1.0)
    best, best_k = max(memory, floor) * ms, 0
    for k, index in enumerate(order, 1):
        freed, added, _, _ = steps[index]
        memory, ms = memory - freed, ms + added
        product = max(memory, floor) * ms
        if product < best:
            best, best_k = product, k
    for index in order[:best_k]:
        _, _, i, mode = steps[index]
        chosen[i] = mode
    return chosen


def plan_recompute(model: nn.Module, example: Tensor, *, reps: int = 2, layer_reps: int = 7) -> RecomputePlan | None:
    """Measure and set ``planned_recompute`` on every plannable SCConv of ``model`` (``SCConv.plannable``);
    None when there is none or nothing trains.

    ``example``: an input batch of the training shape, device and layout; call it under the autocast the
    training uses. ``reps``: timed whole steps after one warm-up step (their median); ``layer_reps``: timed
    keep/recompute pairs per distinct layer after one warm-up pair. The model's state is left as it was.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, SCConv) and m.plannable]
    if not names or not any(p.requires_grad for p in model.parameters()):
        return None
    start = time.perf_counter()
    devices = [example.device.index or 0] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        step_ms, step_bytes, inputs, costs = _measure(model, example, names, reps, layer_reps)
    _release_freed_memory(example.device)
    choices = choose_recompute(step_ms, step_bytes, [
        {mode: (cost["keep"][1] - cost[mode][1], cost[mode][0] - cost["keep"][0]) for mode in cost if mode != "keep"}
        for cost in costs])
    layers = tuple(_layer_row(name, tuple(inputs[name][0]), cost, choice)
                   for name, cost, choice in zip(names, costs, choices))
    modules = dict(model.named_modules())
    for layer in layers:
        modules[layer.name].planned_recompute = layer.recompute
    return RecomputePlan(step_ms, step_bytes, layers, time.perf_counter() - start)


def _layer_row(name: str, input_shape: tuple[int, ...], cost: dict[str, tuple[float, int]],
               choice: str) -> LayerCost:
    """The plan's row of one layer from its ``_layer_cost`` (no ``sru`` entry: None there)."""
    (keep_ms, keep_bytes), (body_ms, body_bytes) = cost["keep"], cost["body"]
    sru_ms, sru_bytes = cost.get("sru", (None, None))
    return LayerCost(name, input_shape, keep_ms=keep_ms, recompute_ms=body_ms, keep_bytes=keep_bytes,
                     recompute_bytes=body_bytes, sru_ms=sru_ms, sru_bytes=sru_bytes, recompute=choice)


def _measure(model: nn.Module, example: Tensor, names: list[str], reps: int, layer_reps: int):
    """(step ms, step bytes, input spec per layer name, ``_layer_cost`` per name), all on a copy of ``model``."""
    twin = copy.deepcopy(model).train()
    set_keep_stats(twin, False)
    layers = {name: twin.get_submodule(name) for name in names}
    for layer in layers.values():
        layer.planned_recompute = "keep"
    inputs: dict[str, tuple] = {}

    def record(name: str):
        def hook(_, args) -> None:  # a pre-hook that returns something replaces the input
            inputs.setdefault(name, _spec(args[0]))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:  # the warm-up step records each layer's input and the step's saved bytes
        out = twin(example)
    finally:
        for hook in hooks:
            hook.remove()
    step_bytes = saved_activation_bytes(out, twin.parameters())
    out.float().sum().backward()
    del out
    step_ms = _median_ms(lambda: twin(example).float().sum().backward(), reps, example.device)
    twin.zero_grad(set_to_none=True)
    measured: dict[tuple, dict[str, tuple[float, int]]] = {}
    costs = []
    for name in names:
        layer, spec = layers[name], inputs[name]
        key = (layer.config, layer.in_channels, layer.out_channels, layer.stride, spec)
        if key not in measured:
            measured[key] = _layer_cost(layer, spec, layer_reps)
        costs.append(measured[key])
    return step_ms, step_bytes, inputs, costs


def _release_freed_memory(device: torch.device) -> None:
    """Hand the copy's freed memory back: the CUDA cache's blocks, and on glibc the heap's free pages
    (``malloc_trim``), which the process would otherwise keep resident (about 600 MB after planning
    DenseNet-121 at batch 16, 112 px, on the CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    trim(0)


def _spec(x: Tensor) -> tuple:
    return tuple(x.shape), tuple(x.stride()), x.dtype, x.device


def _layer_cost(layer: SCConv, spec: tuple, reps: int) -> dict[str, tuple[float, int]]:
    """{mode: (ms, saved bytes)} of one layer on a random input of ``spec``, for each of its modes
    (``SCConv.recompute_modes``).

    Each rep keeps once and then runs every other mode, and a mode's added time is the median of its
    differences to that rep's keep call, so that drift of a shared machine cancels: a small layer's
    difference is a fraction of a millisecond.
    """
    shape, stride, dtype, device = spec
    x = torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
    modes = layer.recompute_modes

    def call(mode: str) -> Callable[[], None]:
        def run() -> None:
            layer.planned_recompute = mode
            layer(x.detach().requires_grad_(True)).float().sum().backward()
        return run

    for mode in modes:
        call(mode)()
    keep: list[float] = []
    added: dict[str, list[float]] = {mode: [] for mode in modes if mode != "keep"}
    for _ in range(max(reps, 1)):
        keep_ms = _ms(call("keep"), device)
        keep.append(keep_ms)
        for mode, diffs in added.items():
            diffs.append(_ms(call(mode), device) - keep_ms)
    saved = {}
    for mode in modes:
        layer.planned_recompute = mode
        out = layer(x.detach().requires_grad_(True))
        saved[mode] = saved_activation_bytes(out, layer.parameters())
        del out
    layer.planned_recompute = "keep"
    layer.zero_grad(set_to_none=True)
    keep_ms = statistics.median(keep)
    cost = {"keep": (keep_ms, saved["keep"])}
    cost.update({mode: (keep_ms + statistics.median(diffs), saved[mode]) for mode, diffs in added.items()})
    return cost


def _median_ms(call: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall ms of ``call`` over ``reps`` calls."""
    return statistics.median(_ms(call, device) for _ in range(max(reps, 1)))


def _ms(call: Callable[[], None], device: torch.device) -> float:
    """Wall ms of one ``call``, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    call()
    sync()
    return 1e3 * (time.perf_counter() - begin)
