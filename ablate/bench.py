"""Benchmark core: training-step time and peak memory of the baseline, reference and efficient SCConv.

Each implementation trains in its own subprocess (a fresh allocator and no shared caches), in
interleaved rounds A B C A B C so that drift of a shared machine spreads over all three. A step is
forward, backward and an SGD step on one fixed random batch. Per implementation:

- ``step_seconds``: the median step time over every timed step of every round (after ``warmup``
  untimed steps in each round).
- ``peak_memory_mb``: the largest, over its rounds, of the peak during the timed steps: on CUDA
  the caching allocator's peak allocated memory; on the CPU the process's peak resident set
  (VmHWM, reset after the warm-up through /proc/self/clear_refs). Nothing is subtracted: the
  Python and torch runtime, the model, its gradients and the optimizer state are in every figure.
- ``compile_seconds`` (with ``compile``): what the warm-up steps took beyond as many steady steps,
  i.e. the compilation (inductor compiles the forward on the first call and the backward on the first
  backward); the median over rounds. Steady step times never include it.
- ``macs``: multiply-accumulates of one image's forward (``ablate.profile.count_macs``).
- ``saved_mb``: the activation memory of a step: what autograd keeps from the forward for the backward
  (``ablate.profile.saved_activation_bytes``, once per storage, parameters left out), measured on one more
  forward after the timed steps. Unlike the peak it leaves out the runtime, the model, the optimizer and,
  when compiled on the CPU, the compiler's own resident state, which grows with the graph.
- ``ops`` (eager runs): the operations one training step dispatches (``ablate.profile.count_ops``, counted
  on one more step after the timed ones), on the code path of the device it runs on. On a GPU each is a
  kernel launch, and at small sizes the step costs about a fixed time per operation, so there
  ``ops_ratio`` follows the eager time ratio where the MAC ratio does not (benchmarks/README.md,
  "Operations per step"). None when compiled.
- ``recompute`` (the efficient implementation's ``scconv.recompute`` policy; with several policies, one
  efficient row each, in the same interleaved rounds) and ``recomputed``: how many of its SCConvs recompute
  their body in backward, per round (``auto`` plans in each round's process, from measured cost, before its
  warm-up; compiled runs keep the ``size`` rule).
- ``time_ratio``, ``memory_ratio``, ``saved_ratio``, ``macs_ratio`` and ``ops_ratio``: against the baseline (order ``none``) of the same
  invocation. ``macs_ratio`` is the floor a time ratio could reach if every MAC cost the same.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import TextIO

from ablate import table
from ablate.config import RECOMPUTE_POLICIES
from ablate.device import PeakMemory, resolve_device
from ablate.errors import ConfigError, check, check_choice, is_int

#: Implementation name -> (scconv.order, scconv.impl).
IMPLS = {
    "baseline": ("none", "reference"),
    "reference": ("sru_cru", "reference"),
    "efficient": ("sru_cru", "efficient"),
}
DEVICES = ("auto", "cpu", "cuda")


class BenchError(RuntimeError):
    """A measuring subprocess failed (out of memory, a crash); the message is one line."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how."""

    backbone: str = "resnet50"  #: registered backbone
    batch_size: int = 16  #: images per step
    image_size: int = 112  #: input side in pixels
    device: str = "auto"  #: auto (CUDA when available), cpu or cuda
    steps: int = 10  #: timed steps per round
    warmup: int = 3  #: untimed steps before them, per round
    repeats: int = 2  #: interleaved rounds
    amp: bool = False  #: bf16 autocast (CUDA only)
    compile: bool = False  #: torch.compile the model (inductor, on CPU or CUDA)
    channels_last: bool = True  #: channels_last model and input on CUDA, as training does (ignored on CPU)
    threads: int | None = None  #: CPU threads per subprocess (None: torch's default)
    impls: tuple[str, ...] = tuple(IMPLS)  #: implementations to run; the baseline is always first
    num_classes: int = 1000  #: classifier outputs
    recompute: tuple[str, ...] = ("auto",)  #: the efficient implementation's scconv.recompute policies, a row each

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "repeats", "num_classes"):
            value = getattr(self, name)
            check(name, value, is_int(value) and value >= 1, "an integer >= 1")
        check("warmup", self.warmup, is_int(self.warmup) and self.warmup >= 0, "an integer >= 0")
        if self.compile:  # the compilation happens in the first step; it must not land in the timed ones
            check("warmup", self.warmup, self.warmup >= 1, "an integer >= 1 with compile")
        check("image_size", self.image_size, is_int(self.image_size) and self.image_size >= 32, "an integer >= 32")
        if self.threads is not None:
            check("threads", self.threads, is_int(self.threads) and self.threads >= 1, "an integer >= 1")
        check_choice("device", self.device, DEVICES)
        for policy in self.recompute:
            check_choice("recompute", policy, RECOMPUTE_POLICIES)
        check("recompute", ",".join(self.recompute), len(self.recompute) >= 1 and len(set(self.recompute)) == len(
            self.recompute), f"distinct policies among {', '.join(RECOMPUTE_POLICIES)}, e.g. auto,never")
        for impl in self.impls:
            check_choice("impls", impl, tuple(IMPLS))
        check("impls", ",".join(self.impls), "baseline" in self.impls and len(set(self.impls)) == len(self.impls),
               "distinct names including baseline (the ratios are against it), e.g. baseline,efficient")

    def resolved(self) -> "BenchConfig":
        """Backbone checked, device resolved, CUDA-only options checked, the baseline first; raises ConfigError."""
        from ablate.models import list_models

        check_choice("backbone", self.backbone, tuple(list_models()))
        device = resolve_device(self.device).type
        if self.amp and device != "cuda":
            raise ConfigError("amp=True is not valid with device='cpu'; accepted: amp on cuda only")
        impls = ("baseline", *(i for i in self.impls if i != "baseline"))
        return replace(self, device=device, impls=impls, channels_last=self.channels_last and device == "cuda")


# -- the parent: interleaved subprocesses ----------------------------------------------------------


def run_bench(cfg: BenchConfig, progress: TextIO | None = None) -> list[dict]:
    """Measure every implementation in ``cfg.impls`` in interleaved rounds; one row per implementation.

    ``progress`` (e.g. stderr) gets one line as each run starts."""
    cfg = cfg.resolved()
    runs = [(impl, policy) for impl in cfg.impls
            for policy in (cfg.recompute if impl == "efficient" else (None,))]
    rounds: dict[tuple[str, str | None], list[dict]] = {run: [] for run in runs}
    for i in range(cfg.repeats):
        for impl, policy in runs:
            if progress is not None:
                note = ": compiling first (minutes on a CPU)" if cfg.compile else ""
                name = impl if policy is None or len(cfg.recompute) == 1 else f"{impl} (recompute {policy})"
                print(f"bench: {cfg.backbone} {name}, round {i + 1} of {cfg.repeats}{note}", file=progress, flush=True)
            rounds[impl, policy].append(_run_worker(cfg, impl, policy))
    return summarise(cfg, rounds)


def summarise(cfg: BenchConfig, rounds: dict[tuple[str, str | None], list[dict]]) -> list[dict]:
    """Rows from the rounds of each (implementation, recompute policy or None) (``step_times``,
    ``warmup_times``, ``peak_memory_mb`` and ``macs`` per round)."""
    rows = []
    for (impl, policy), results in rounds.items():
        rows.append({
            "impl": impl,
            "backbone": cfg.backbone,
            "batch_size": cfg.batch_size,
            "image_size": cfg.image_size,
            "device": cfg.device,
            "step_seconds": statistics.median(t for r in results for t in r["step_times"]),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in results),
            "saved_mb": max(r["saved_mb"] for r in results),
            "compile_seconds": statistics.median(_compile_seconds(r) for r in results) if cfg.compile else None,
            "macs": results[0]["macs"],
            "ops": results[0].get("ops"),
            "recompute": policy,
            "recomputed": _recomputed(results),
            "amp": cfg.amp,
            "compiled": cfg.compile,
            "channels_last": cfg.channels_last,
            "threads": results[0]["threads"],
            "steps": cfg.steps,
            "repeats": cfg.repeats,
        })
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["step_seconds"] / base["step_seconds"]
        row["memory_ratio"] = row["peak_memory_mb"] / base["peak_memory_mb"]
        row["saved_ratio"] = row["saved_mb"] / base["saved_mb"]
        row["macs_ratio"] = row["macs"] / base["macs"]
        row["ops_ratio"] = row["ops"] / base["ops"] if row["ops"] and base["ops"] else None
    return rows


def _recomputed(results: list[dict]) -> str | None:
    """``recomputed/planned`` layers, each distinct count once in round order (a plan is made per round);
    None where nothing was planned."""
    counts = [r["recomputed"] for r in results if r.get("recomputed") is not None]
    return ",".join(dict.fromkeys(counts)) or None


def _compile_seconds(result: dict) -> float:
    """What one round's warm-up steps took beyond as many steady steps (the compilation, when compiled)."""
    steady = statistics.median(result["step_times"])
    return max(0.0, sum(result["warmup_times"]) - steady * len(result["warmup_times"]))


def _run_worker(cfg: BenchConfig, impl: str, policy: str | None = None) -> dict:
    """One round of one implementation in a fresh interpreter; its result is the last line it prints."""
    import ablate

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ablate.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    spec = json.dumps({"config": asdict(cfg), "impl": impl, "recompute": policy})
    proc = subprocess.run([sys.executable, "-m", "ablate.bench", "--worker", spec], env=env,
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"bench: the {impl} run of {cfg.backbone} failed (exit {proc.returncode}): {last}")
    return json.loads(lines[-1])


# -- the worker: one implementation, one round -----------------------------------------------------


def training_step(cfg: BenchConfig, impl: str, policy: str | None = None):
    """The model of ``impl`` (the efficient one with recompute ``policy``, default auto) and its training step
    as the bench times it: ``(model, x, forward, step)``, ``forward()`` the loss of the fixed batch ``x`` and
    ``step()`` forward, backward and an SGD step with momentum. ``cfg`` resolved."""
    import torch

    from ablate.config import ModelConfig, SCConvConfig
    from ablate.models import build_model

    device = torch.device(cfg.device)
    order, impl_name = IMPLS[impl]
    model_cfg = ModelConfig(backbone=cfg.backbone, num_classes=cfg.num_classes,
                            scconv=SCConvConfig(order=order, impl=impl_name, recompute=policy or "auto"))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(model_cfg, seed=0).to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_model = torch.compile(model) if cfg.compile else model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
    x = x.to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).to(device)

    def forward() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):  # amp: CUDA only
            return torch.nn.functional.cross_entropy(step_model(x), y)

    def step() -> None:
        forward().backward()
        optimizer.step()

    return model, x, forward, step


def measure(cfg: BenchConfig, impl: str, policy: str | None = None) -> dict:
    """Build the model for ``impl`` (the efficient one with recompute ``policy``, default auto), warm up, then
    time ``cfg.steps`` train steps and take their peak memory."""
    import torch

    from ablate.profile import count_macs, count_ops, saved_activation_bytes

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model, x, forward, step = training_step(cfg, impl, policy)
    macs = count_macs(model, cfg.image_size)

    recomputed = None
    if not cfg.compile:  # as training does: plan once, before the first step
        from ablate.nn.recompute_plan import plan_recompute

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            plan = plan_recompute(model, x)
        if plan is not None:
            recomputed = plan.tally

    memory = PeakMemory(device)
    warmup_times = []
    for _ in range(cfg.warmup):
        memory.sync()
        start = time.perf_counter()
        step()
        memory.sync()
        warmup_times.append(time.perf_counter() - start)
    memory.reset()
    times = []
    for _ in range(cfg.steps):
        memory.sync()
        start = time.perf_counter()
        step()
        memory.sync()
        times.append(time.perf_counter() - start)
    peak = memory.read_mb()
    saved = saved_activation_bytes(forward(), model.parameters()) / 2**20
    ops = None if cfg.compile else sum(count_ops(step).values())  # compiled kernels bypass the dispatcher
    return {"step_times": times, "warmup_times": warmup_times, "peak_memory_mb": peak, "saved_mb": saved,
            "macs": macs, "ops": ops, "threads": torch.get_num_threads(), "recomputed": recomputed}


# -- output ----------------------------------------------------------------------------------------

_COLUMNS = [
    ("impl", "impl", str), ("backbone", "backbone", str), ("batch", "batch_size", str),
    ("image", "image_size", str), ("device", "device", str), ("amp", "amp", lambda v: "bf16" if v else "-"),
    ("compiled", "compiled", lambda v: "yes" if v else "-"), ("threads", "threads", str),
    ("compile s", "compile_seconds", lambda v: "-" if v is None else f"{v:.0f}"),
    ("step s", "step_seconds", lambda v: f"{v:.4f}"),
    ("peak MB", "peak_memory_mb", lambda v: f"{v:.0f}"), ("time x", "time_ratio", lambda v: f"{v:.3f}"),
    ("MACs x", "macs_ratio", lambda v: f"{v:.3f}"), ("ops x", "ops_ratio", lambda v: "-" if v is None else f"{v:.2f}"),
    ("memory x", "memory_ratio", lambda v: f"{v:.3f}"),
    ("saved MB", "saved_mb", lambda v: f"{v:.0f}"), ("saved x", "saved_ratio", lambda v: f"{v:.3f}"),
    ("recompute", "recompute", lambda v: v or "-"), ("recomputed", "recomputed", lambda v: v or "-"),
]
_FIRST_NUMERIC = 8  # "compile s" on: right-aligned


def format_table(rows: list[dict]) -> str:
    """An aligned text table of bench rows (from one or several invocations)."""
    headers = [h for h, _, _ in _COLUMNS]
    body = [[fmt(row.get(key)) for _, key, fmt in _COLUMNS] for row in rows]  # older rows may lack ops
    return table.format_table(headers, body, right_from=_FIRST_NUMERIC)


# -- the worker's entry: `python -m ablate.bench --worker SPEC` ------------------------------------


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    config = spec["config"]
    fields = dict(config, impls=tuple(config["impls"]), recompute=tuple(config["recompute"]))
    print(json.dumps(measure(BenchConfig(**fields), spec["impl"], spec["recompute"])))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit("usage: python -m ablate.bench --worker SPEC (internal; use `ablate bench`)")
