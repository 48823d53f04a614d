"""Efficient SCConv: the reference's outputs, gradients, probes and state dict, with far less kept for backward."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from ablate.config import ATTENTIONS, GAMMA_NORMS, GATE_MODES, ORDERS, SCConvConfig
from ablate.nn import CRU, SRU, SCConv, convert, iter_gates, set_keep_stats
from ablate.nn import efficient_cru, efficient_sru
from ablate.nn.efficient import RECOMPUTE_MIN_BYTES, EfficientCRU, EfficientSRU
from ablate.nn.efficient_cru import pointwise, pointwise_as_bmm
from ablate.nn.efficient_sru import code_path, normalised, normalised_any_layout
from ablate.profile import count_ops, saved_activation_bytes as kept_bytes

# In == out with a PWC2, and in != out where the squeezed lower path fills the output (no PWC2).
CHANNEL_CASES = [(16, 16), (16, 4)]


def pair(in_channels, out_channels, stride=1, **fields):
    """(reference, efficient) SCConv with the same weights; gamma has mixed signs so that every gate mode matters."""
    config = SCConvConfig(impl="reference", **fields)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = SCConv(in_channels, out_channels, stride, config)
        for module in reference.modules():
            if isinstance(module, SRU):
                with torch.no_grad():
                    module.gn.weight.uniform_(-0.5, 1.5)
                    module.gn.bias.normal_()
    efficient = SCConv(in_channels, out_channels, stride, replace(config, impl="efficient"))
    efficient.load_state_dict(reference.state_dict())
    return reference, efficient


def run(model, x, call=None):
    """Output, input gradient and parameter gradients of one forward (``call``, default the model) and backward,
    with a random upstream gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = (model if call is None else call)(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    y.backward(upstream)
    return y, x.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_same_function(reference, efficient, x, call=None):
    """Outputs and input gradients within 1e-5 relative; parameter gradients (sums over many terms) within
    1e-5 relative plus 1e-6 of their largest entry; None gradients exactly where the reference has them."""
    y_ref, dx_ref, grads_ref = run(reference, x)
    y_eff, dx_eff, grads_eff = run(efficient, x, call)
    torch.testing.assert_close(y_eff, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_eff, dx_ref, rtol=1e-5, atol=1e-6)
    assert grads_eff.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        assert (grads_eff[name] is None) == (ref is None), name
        if ref is not None:
            atol = 1e-6 * float(ref.abs().max())
            torch.testing.assert_close(grads_eff[name], ref, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def random_input(channels, n=2, h=7, w=9, seed=1):
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", CHANNEL_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("gamma_norm", GAMMA_NORMS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("order", ORDERS)
def test_same_function_as_reference(order, gate_mode, attention, gamma_norm, stride, channels):
    in_channels, out_channels = channels
    if order == "parallel" and in_channels != out_channels:
        pytest.skip("parallel needs in_channels == out_channels")
    reference, efficient = pair(in_channels, out_channels, stride, order=order, gate_mode=gate_mode,
                                attention=attention, gamma_norm=gamma_norm)
    assert_same_function(reference, efficient, random_input(in_channels))


def large_input(channels=16, seed=1):
    """An input of RECOMPUTE_MIN_BYTES: large enough for the efficient SCConv to recompute its body."""
    side = int((RECOMPUTE_MIN_BYTES / (4 * 4 * channels)) ** 0.5)
    x = torch.randn(4, channels, side, side, generator=torch.Generator().manual_seed(seed))
    assert x.numel() * x.element_size() >= RECOMPUTE_MIN_BYTES
    return x


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("order", [o for o in ORDERS if o not in ("none", "sru")])
def test_same_function_when_recomputing(order, gate_mode, stride):
    attention = "pairwise" if gate_mode in ("binary", "soft") else "global"
    reference, efficient = pair(16, 16, stride, order=order, gate_mode=gate_mode, attention=attention)
    assert_same_function(reference, efficient, large_input())


def test_parameter_gradients_when_recomputing_without_input_gradient():
    reference, efficient = pair(16, 16, 1, gate_mode="soft")
    x = large_input()
    for model in (reference, efficient):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
    for (name, ref), eff in zip(reference.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(eff.grad, ref.grad, rtol=1e-5, atol=1e-6 * float(ref.grad.abs().max()))


def test_same_function_when_alpha_splits_unevenly():
    reference, efficient = pair(16, 16, 1, alpha=0.75, gate_mode="reference")
    assert_same_function(reference, efficient, random_input(16))


def test_same_function_on_channels_last_input():
    reference, efficient = pair(16, 16, 1, gate_mode="soft", attention="global")
    assert_same_function(reference, efficient, random_input(16).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("max_weight", [0, efficient_cru.POINTWISE_BMM_MAX_WEIGHT], ids=["conv", "bmm"])
@pytest.mark.parametrize("order", ["sru_cru", "cru", "cru_sru", "parallel"])
def test_same_function_with_1x1_convs_as_convs_or_products(order, max_weight, monkeypatch):
    monkeypatch.setattr(efficient_cru, "POINTWISE_BMM_MAX_WEIGHT", max_weight)
    reference, efficient = pair(16, 16, 1, order=order, gate_mode="reference", attention="global")
    assert_same_function(reference, efficient, random_input(16))


@pytest.mark.parametrize("layout", ["nchw", "channel_slice", "channels_last"])
def test_pointwise_is_the_1x1_conv(layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1, bias=False).double()
    x = torch.randn(3, 12 if layout == "channel_slice" else 8, 5, 4, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for call in (conv, lambda t: pointwise(conv, t)):
        conv.zero_grad(set_to_none=True)
        leaf = x.detach().requires_grad_(True)
        part = leaf[:, 4:] if layout == "channel_slice" else leaf
        y = call(part)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
        results.append((y.detach(), leaf.grad, conv.weight.grad))
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pointwise_takes_the_product_only_for_small_weights_laid_out_by_rows():
    x = torch.randn(2, 64, 5, 5)
    small = nn.Conv2d(64, 32, 1, bias=False)
    assert pointwise_as_bmm(small, x)
    assert pointwise_as_bmm(small, torch.randn(2, 96, 5, 5)[:, 32:])  # a channel slice: rows still follow
    assert not pointwise_as_bmm(small, x.contiguous(memory_format=torch.channels_last))
    assert not pointwise_as_bmm(nn.Conv2d(64, 32, 1, bias=True), x)
    assert not pointwise_as_bmm(nn.Conv2d(64, 32, 1, stride=2, bias=False), x)
    assert not pointwise_as_bmm(nn.Conv2d(64, 32, 3, padding=1, bias=False), x)
    assert not pointwise_as_bmm(nn.Conv2d(256, 128, 1, bias=False), torch.randn(2, 256, 4, 4))


def test_same_function_in_float64_to_rounding():
    # In float64 the only differences left are the order of floating-point sums.
    reference, efficient = pair(16, 16, 2, gate_mode="ste", attention="global", gamma_norm="abs")
    reference.double(), efficient.double()
    x = large_input().double()
    y_ref, dx_ref, grads_ref = run(reference, x)
    y_eff, dx_eff, grads_eff = run(efficient, x)
    torch.testing.assert_close(y_eff, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_eff, dx_ref, rtol=1e-12, atol=1e-12)
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads_eff[name], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_groupnorm_without_layout_copy_matches_pytorch_kernel(memory_format):
    # The path CUDA takes for channels_last inputs, checked on the CPU against PyTorch's GroupNorm kernel.
    x = (random_input(16, n=3) * 3 + 1).contiguous(memory_format=memory_format)
    gamma_w, beta_w = torch.linspace(-1, 2, 16), torch.linspace(0.5, -0.5, 16)
    for got, want in zip(normalised_any_layout(x, gamma_w, beta_w, 4, 1e-5)[:3], normalised(x, gamma_w, beta_w, 4, 1e-5)[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    z = normalised(x, gamma_w, beta_w, 4, 1e-5)[0]
    torch.testing.assert_close(z, torch.nn.functional.group_norm(x, 4, gamma_w, beta_w), rtol=1e-5, atol=1e-5)


def test_binary_gate_leaves_groupnorm_gradients_none():
    _, efficient = pair(16, 16, 1, gate_mode="binary")
    for x in (random_input(16), large_input()):
        _, dx, grads = run(efficient, x)
        assert grads["sru.gn.weight"] is None and grads["sru.gn.bias"] is None
        assert dx.abs().sum() > 0 and grads["cru.gwc.weight"] is not None


def test_close_to_reference_under_bf16_autocast():
    reference, efficient = pair(16, 16, 1, gate_mode="reference", attention="global")
    for x in (random_input(16), large_input()):
        outs = []
        for model in (reference, efficient):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(run(model, x))
        (y_ref, dx_ref, _), (y_eff, dx_eff, _) = outs
        assert y_eff.dtype == y_ref.dtype and dx_eff.dtype == dx_ref.dtype
        # bf16 has 8 significant bits: a couple of its steps at the largest magnitude.
        y_eff, y_ref = y_eff.detach().float(), y_ref.detach().float()
        torch.testing.assert_close(y_eff, y_ref, rtol=0, atol=2e-2 * float(y_ref.abs().max()))
        torch.testing.assert_close(dx_eff, dx_ref, rtol=0, atol=2e-2 * float(dx_ref.abs().max()))


def saved_activation_bytes(model, x) -> int:
    """Bytes of distinct non-parameter storages that autograd keeps for backward after one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


def test_keeps_only_its_input_when_recomputing():
    reference, efficient = pair(16, 16, 2)
    x = large_input().requires_grad_(True)
    conv_only = SCConv(16, 16, 2, SCConvConfig(order="none"))
    # The replaced conv keeps its input; the efficient SCConv keeps nothing else, the reference several times it.
    assert saved_activation_bytes(conv_only, x) == saved_activation_bytes(efficient, x) == x.numel() * 4
    assert saved_activation_bytes(reference, x) > 3 * x.numel() * 4


def test_keeps_less_than_reference_on_small_inputs():
    reference, efficient = pair(128, 32, 1)
    x = random_input(128, n=4, h=8, w=8).requires_grad_(True)
    assert saved_activation_bytes(efficient, x) < saved_activation_bytes(reference, x) / 2


def assert_identical(got, want):
    """``run`` results equal bit for bit, None gradients alike."""
    (y, dx, grads), (y_want, dx_want, grads_want) = got, want
    assert torch.equal(y, y_want) and torch.equal(dx, dx_want)
    assert grads.keys() == grads_want.keys()
    for name, g in grads.items():
        assert (g is None and grads_want[name] is None) or torch.equal(g, grads_want[name]), name


@pytest.mark.parametrize("alpha", [0.5, 0.75], ids=["halves", "uneven"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_recomputing_the_sru_and_squeezes_changes_nothing_but_what_is_kept(gate_mode, stride, alpha):
    _, kept = pair(16, 16, stride, gate_mode=gate_mode, alpha=alpha, recompute="never")
    _, partial = pair(16, 16, stride, gate_mode=gate_mode, alpha=alpha, recompute="sru")
    x = random_input(16)
    assert_identical(run(partial, x), run(kept, x))
    # It no longer keeps the SRU's output (the size of the pooled input) nor the CRU's squeezed inputs.
    x = x.detach().requires_grad_(True)
    freed = kept_bytes(kept(x), kept.parameters()) - kept_bytes(partial(x), partial.parameters())
    n, c, h, w = kept.pool(x).shape
    squeezed = kept.cru.squeeze1.out_channels + kept.cru.squeeze2.out_channels
    assert freed == (c + squeezed) * n * h * w * 4


@pytest.mark.parametrize("max_weight", [0, efficient_cru.POINTWISE_BMM_MAX_WEIGHT], ids=["conv", "bmm"])
def test_recomputing_the_sru_output_with_1x1_convs_as_convs_or_products(max_weight, monkeypatch):
    monkeypatch.setattr(efficient_cru, "POINTWISE_BMM_MAX_WEIGHT", max_weight)
    _, kept = pair(16, 16, 1, gate_mode="reference", recompute="never")
    _, partial = pair(16, 16, 1, gate_mode="reference", recompute="sru")
    for x in (random_input(16), random_input(16).contiguous(memory_format=torch.channels_last)):
        assert_identical(run(partial, x), run(kept, x))


def test_recomputing_the_sru_output_under_bf16_autocast_and_a_retained_graph():
    _, kept = pair(16, 16, 1, gate_mode="soft", attention="global", recompute="never")
    _, partial = pair(16, 16, 1, gate_mode="soft", attention="global", recompute="sru")
    x = random_input(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_identical(run(partial, x), run(kept, x))
    # A graph kept for a second backward recomputes again: twice the gradients, as when keeping.
    grads = []
    for model in (partial, kept):
        model.zero_grad(set_to_none=True)
        y = model(x.detach().requires_grad_(True))
        y.sum().backward(retain_graph=True)
        y.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_recomputing_the_sru_output_leaves_the_probes_as_the_forward_set_them():
    _, partial = pair(16, 8, 1, gate_mode="reference", attention="global", recompute="sru")
    set_keep_stats(partial, True)
    y = partial(random_input(16).requires_grad_(True))
    r, mask = partial.sru.last_r, partial.sru.last_mask
    y.sum().backward()
    assert partial.sru.last_r is r and partial.sru.last_mask is mask
    _, kept = pair(16, 8, 1, gate_mode="reference", attention="global", recompute="never")
    set_keep_stats(kept, True)
    kept(random_input(16))
    assert torch.equal(r, kept.sru.last_r)


@pytest.mark.parametrize("order", ["cru", "cru_sru", "parallel"])
def test_sru_policy_keeps_where_the_sru_output_feeds_no_squeeze(order):
    _, kept = pair(16, 16, 1, order=order, recompute="never")
    _, partial = pair(16, 16, 1, order=order, recompute="sru")
    x = random_input(16).requires_grad_(True)
    assert_identical(run(partial, x), run(kept, x))
    assert kept_bytes(partial(x), partial.parameters()) == kept_bytes(kept(x), kept.parameters())


def test_recomputing_the_sru_output_compiles_to_the_same_function():
    reference, partial = pair(16, 16, 1, gate_mode="reference", attention="global", recompute="sru")
    compiled = torch.compile(partial, backend="aot_eager", fullgraph=True)
    assert_same_function(reference, partial, random_input(16), call=compiled)


@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_probes_match_reference(gate_mode, attention):
    reference, efficient = pair(16, 8, 1, gate_mode=gate_mode, attention=attention)
    x = random_input(16)
    for model in (reference, efficient):
        set_keep_stats(model, True)
        with torch.no_grad():
            model(x)
    assert not efficient.sru.last_r.requires_grad and efficient.sru.last_mask.dtype == torch.bool
    torch.testing.assert_close(efficient.sru.last_r, reference.sru.last_r, rtol=1e-5, atol=1e-6)
    assert torch.equal(efficient.sru.last_mask, reference.sru.last_mask)
    torch.testing.assert_close(efficient.cru.last_beta, reference.cru.last_beta, rtol=1e-5, atol=1e-6)
    set_keep_stats(efficient, False)
    assert efficient.sru.last_r is None and efficient.cru.last_beta is None


def test_state_dicts_interchange():
    reference, efficient = pair(16, 16, 2, order="parallel")
    ref_state, eff_state = reference.state_dict(), efficient.state_dict()
    assert list(ref_state) == list(eff_state)
    assert all(ref_state[k].shape == eff_state[k].shape for k in ref_state)
    other = SCConv(16, 16, 2, SCConvConfig(order="parallel", impl="reference"))
    other.load_state_dict(efficient.state_dict())
    x = random_input(16)
    torch.testing.assert_close(efficient(x), other(x), rtol=1e-5, atol=1e-6)


def test_same_submodules_and_gate_discovery():
    reference, efficient = pair(16, 16, 2)
    assert [n for n, _ in reference.named_modules()] == [n for n, _ in efficient.named_modules()]
    assert isinstance(efficient.sru, EfficientSRU) and isinstance(efficient.sru, SRU)
    assert isinstance(efficient.cru, EfficientCRU) and isinstance(efficient.cru, CRU)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    convert(model, SCConvConfig(impl="efficient"))
    assert [kind for _, kind, _ in iter_gates(model)] == ["sru", "cru", "sru", "cru"]


def test_compiles_to_the_same_function():
    # aot_eager traces forward and backward like inductor does, without generating code.
    reference, efficient = pair(16, 16, 2, gate_mode="reference", attention="global")
    compiled = torch.compile(efficient, backend="aot_eager", fullgraph=True)
    assert_same_function(reference, efficient, large_input(), call=compiled)


@pytest.mark.slow  # inductor generates and builds C++ kernels: about a minute on a busy 2-core machine
def test_inductor_compiles_to_the_same_function():
    # The code a GPU or CPU would run: inductor-generated kernels, in one graph, on the recomputing path.
    reference, efficient = pair(16, 16, 1, gate_mode="binary", attention="pairwise")
    compiled = torch.compile(efficient, backend="inductor", fullgraph=True)
    assert_same_function(reference, efficient, large_input(), call=compiled)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("gate_mode", ["reference", "soft", "ste"])
def test_same_function_with_groupnorm_backward_kernel(gate_mode, memory_format, monkeypatch):
    # The GPU's SRU backward (PyTorch's GroupNorm backward kernel in place of the closed form), run on the CPU.
    monkeypatch.setattr(efficient_sru, "GROUP_NORM_BACKWARD_KERNEL_DEVICES", ("cpu", "cuda"))
    for recompute in ("never", "always"):
        reference, efficient = pair(16, 16, 1, gate_mode=gate_mode, attention="global", recompute=recompute)
        x = random_input(16).contiguous(memory_format=memory_format)
        assert_same_function(reference, efficient, x)


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_same_function_on_the_gpu_code_path(gate_mode):
    # The forward keeps the statistics and z's coefficients there, and the backward rebuilds z from them.
    with code_path("gpu") as memory_format:
        x = random_input(16).contiguous(memory_format=memory_format)
        for recompute in ("never", "always", "sru"):
            reference, efficient = pair(16, 16, 1, gate_mode=gate_mode, attention="pairwise", recompute=recompute)
            assert_same_function(reference, efficient, x)


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_gpu_code_path_computes_the_groupnorm_statistics_once_per_step(gate_mode):
    # Each operation is a kernel launch on a GPU, where SCConv's step time follows their number: the backward
    # rebuilds z from what the forward kept, with no second reduction over the input.
    _, efficient = pair(16, 16, 1, gate_mode=gate_mode, recompute="never")
    with code_path("gpu") as memory_format:
        x = random_input(16).contiguous(memory_format=memory_format).requires_grad_(True)
        ops = count_ops(lambda: efficient(x).sum().backward())
    assert ops["var_mean"] == 1
    assert "native_group_norm" not in ops


def test_gpu_code_path_compiles_to_the_same_function():
    # What compiled CUDA training traces: the kept statistics and coefficients go through the compiler too.
    with code_path("gpu") as memory_format:
        reference, efficient = pair(16, 16, 1, gate_mode="reference", attention="global")
        compiled = torch.compile(efficient, backend="aot_eager", fullgraph=True)
        assert_same_function(reference, efficient, large_input().contiguous(memory_format=memory_format), call=compiled)
