"""Batch-tiled contraction: same numbers as the whole-batch program, less memory."""

from __future__ import annotations

import pytest
import torch

from ndcompile.errors import NdCompileError
from ndcompile.ir.program import ContractionProgram
from ndcompile.ir.tiled import (
    AUTO_WHOLE_TILES,
    MIN_TILE,
    choose_tile,
    graph_tile,
    row_elements,
    should_tile,
    tiled_contract,
    tiled_contract_backward,
)
from ndcompile.layers.memory import peak_live_bytes
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.testing import dispatched_ops

CASES = [((6, 8), (12, 10), 1), ((6, 8), (12, 10), 3), ((4, 5, 3), (3, 6, 2), 2)]


def _pair(in_shape, out_shape, rank, tile, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    tiled = NdLinear(in_shape, out_shape, rank=rank, tile=tile, dtype=dtype, **kw)
    whole = NdLinear(in_shape, out_shape, rank=rank, tile=0, dtype=dtype, **kw)
    whole.load_state_dict(tiled.state_dict())
    with torch.no_grad():
        if tiled.bias is not None:
            tiled.bias.normal_()
            whole.bias.copy_(tiled.bias)
    return tiled, whole


@pytest.mark.parametrize(("in_shape", "out_shape", "rank"), CASES)
def test_program_text_round_trip(in_shape, out_shape, rank):
    layer = NdLinear(in_shape, out_shape, rank=rank)
    program = layer.plan().program
    back = ContractionProgram.from_text(program.to_text())
    assert back == program
    x = torch.randn(5, *in_shape)
    operands = layer.factor_operands()
    torch.testing.assert_close(back.run(x, *operands), program.run(x, *operands))


@pytest.mark.parametrize(("in_shape", "out_shape", "rank"), CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_matches_whole_batch_forward_and_backward(in_shape, out_shape, rank, bias, dtype):
    tiled, whole = _pair(in_shape, out_shape, rank, tile=16, dtype=dtype, bias=bias)
    x = torch.randn(83, *in_shape, dtype=dtype)  # not a multiple of the tile
    xt, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yw = tiled(xt), whole(xw)
    # float32: tiles sum the factor gradients in another order than the whole batch
    # (a relative 3e-5 seen on an Intel Xeon); float64 holds the check to 1e-10.
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(yt, yw, **tol)
    g = torch.randn_like(yt)
    yt.backward(g)
    yw.backward(g)
    torch.testing.assert_close(xt.grad, xw.grad, **tol)
    for (name, pt), pw in zip(tiled.named_parameters(), whole.parameters(), strict=True):
        assert pt.grad is not None, name
        torch.testing.assert_close(pt.grad, pw.grad, **tol)


def test_tiled_path_is_taken_and_flat_layers_tile_too():
    tiled, whole = _pair((6, 8), (12, 10), 2, tile=16, flat=True)
    x = torch.randn(4, 20, 48, dtype=torch.float64)  # 80 rows in two leading dims
    assert dispatched_ops(lambda: tiled(x))["ndcompile::tiled_contract"] == 1
    y = tiled(x)
    torch.testing.assert_close(y, whole(x))
    assert y.shape == (4, 20, 120)


def test_frozen_factors_or_input_get_no_gradient():
    tiled, _ = _pair((6, 8), (12, 10), 2, tile=16)
    for p in tiled.parameters():
        p.requires_grad_(False)
    x = torch.randn(64, 6, 8, dtype=torch.float64, requires_grad=True)
    tiled(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in tiled.parameters())
    tiled.requires_grad_(True)
    x = torch.randn(64, 6, 8, dtype=torch.float64)
    tiled(x).sum().backward()
    assert all(p.grad is not None for p in tiled.parameters())


def test_opcheck_of_the_custom_op():
    layer = NdLinear((6, 8), (12, 10), rank=2, tile=16, dtype=torch.float64)
    x = torch.randn(50, 6, 8, dtype=torch.float64, requires_grad=True)
    bias = layer.full_bias().reshape(12, 10)
    args = (x, layer.factor_operands(), bias, layer.plan().program.to_text(), 16)
    torch.library.opcheck(tiled_contract, args)


@pytest.mark.parametrize("bias_shape", [(12, 10), (1, 12, 10), (10,), None])
@pytest.mark.parametrize("x_grad", [True, False])
def test_tiled_bias_gradient_is_summed_per_tile(bias_shape, x_grad):
    layer = NdLinear((6, 8), (12, 10), rank=2, tile=16, dtype=torch.float64)
    x = torch.randn(50, 6, 8, dtype=torch.float64, requires_grad=x_grad)
    factors = [f.detach().requires_grad_() for f in layer.factor_operands()]
    text = layer.plan().program.to_text()
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=torch.float64)
    if bias is not None:
        bias.requires_grad_()
    y = tiled_contract(x, factors, bias, text, 16)
    want = layer.plan().program.run(x, *factors) + (0 if bias is None else bias)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    leaves = [t for t in (x, *factors, bias) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, leaves, g)
    refs = torch.autograd.grad(want, leaves, g)
    for value, ref in zip(got, refs, strict=True):
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "needs", [[True, True, True, True], [False, False, False, True], [True, True, True]]
)
def test_opcheck_of_the_backward_op(needs):
    layer = NdLinear((6, 8), (12, 10), rank=2, tile=16, dtype=torch.float64)
    x = torch.randn(50, 6, 8, dtype=torch.float64)
    grad = torch.randn(50, 12, 10, dtype=torch.float64)
    text = layer.plan().program.to_text()
    args = (grad, x, [f.detach() for f in layer.factor_operands()], text, 16, needs)
    torch.library.opcheck(tiled_contract_backward, args)
    out = tiled_contract_backward(*args)
    assert len(out) == len(needs)


def test_backward_op_rejects_a_wrong_flag_count():
    layer = NdLinear((6, 8), (12, 10), rank=2, tile=16)
    x, grad = torch.randn(40, 6, 8), torch.randn(40, 12, 10)
    text = layer.plan().program.to_text()
    with pytest.raises(ValueError, match="5 flags for 3 operands"):
        tiled_contract_backward(grad, x, layer.factor_operands(), text, 16, [True] * 5)


def test_half_precision_gradients_are_summed_in_float32():
    torch.manual_seed(0)
    layer = NdLinear((6, 8), (12, 10), rank=2, tile=16, dtype=torch.bfloat16)
    x = torch.randn(4096, 6, 8, dtype=torch.bfloat16)
    factors = [f.detach().requires_grad_() for f in layer.factor_operands()]
    bias = torch.randn(12, 10, dtype=torch.bfloat16, requires_grad=True)
    y = tiled_contract(x, factors, bias, layer.plan().program.to_text(), 16)
    g = torch.randn_like(y)
    y.backward(g)
    want = g.double().sum(0)
    assert bias.grad is not None and bias.grad.dtype == torch.bfloat16
    # One bf16 rounding of a float32 sum (256 bf16 partial sums would be ~10x worse).
    rel = (bias.grad.double() - want).norm() / want.norm()
    assert rel < 5e-3, rel


def test_compile_keeps_the_op_and_export_gets_plain_ops():
    tiled, whole = _pair((6, 8), (12, 10), 2, tile=16, dtype=torch.float32)
    x = torch.randn(64, 6, 8, requires_grad=True)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    compiled = torch.compile(tiled, backend=backend, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert any("tiled_contract" in t for t in seen)
    torch.testing.assert_close(y, whole(x))
    ep = torch.export.export(tiled, (x.detach(),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not any("ndcompile" in t for t in targets)
    torch.testing.assert_close(ep.module()(x.detach()), whole(x))


def test_should_tile_rules():
    x = torch.randn(100, 3)
    assert should_tile(x, 16)
    assert not should_tile(x[:32], 16)  # at most two tiles: run whole
    assert not should_tile(x, 0)
    assert not should_tile(x.to("meta"), 16)


def test_choose_tile_fits_the_budget():
    layer = NdLinear((24, 32), (48, 64))
    per_row = row_elements(layer.plan().program, (24, 32), [(48, 24), (64, 32)])
    # The largest step holds the (24, 64) intermediate and the (48, 64) output.
    assert per_row == 24 * 64 + 48 * 64
    tile = choose_tile(per_row, 4, budget=1 << 20)
    assert tile % 8 == 0 and tile * per_row * 4 <= 1 << 20 < (tile + 8) * per_row * 4
    assert choose_tile(10**9, 4) == MIN_TILE
    assert layer.tile == choose_tile(per_row, 4)


def test_tiled_training_holds_less_than_the_whole_batch_and_the_dense_layer():
    tiled, whole = _pair((24, 32), (48, 64), 4, tile="auto", dtype=torch.float32)
    x = torch.randn(1024, 24, 32, requires_grad=True)
    g = torch.randn(1024, 48, 64)

    def step(layer):
        return peak_live_bytes(lambda: layer(x).backward(g), [*layer.parameters(), x, g])

    dense = torch.nn.Linear(768, 3072)
    xf, gf = x.detach().reshape(1024, 768).requires_grad_(), g.reshape(1024, 3072)
    dense_peak = peak_live_bytes(lambda: dense(xf).backward(gf), [*dense.parameters(), xf, gf])
    tiled_peak, whole_peak = step(tiled), step(whole)
    assert tiled_peak.peak_bytes < whole_peak.peak_bytes / 2
    assert tiled_peak.peak_bytes <= dense_peak.peak_bytes


def test_bad_tile_is_a_clear_error():
    with pytest.raises(NdCompileError, match="tile"):
        NdLinear((4, 4), (4, 4), tile=-1)


def test_autocast_runs_the_plain_ops():
    tiled, whole = _pair((6, 8), (12, 10), 2, tile=16, dtype=torch.float32)
    x = torch.randn(64, 6, 8)
    assert should_tile(x, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not should_tile(x, 16)
        y, ref = tiled(x), whole(x)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize(("in_shape", "out_shape", "rank"), CASES)
def test_flop_counter_sees_through_the_tiled_op(in_shape, out_shape, rank):
    from torch.utils.flop_counter import FlopCounterMode

    tiled, whole = _pair(in_shape, out_shape, rank, tile=16, dtype=torch.float32)
    x = torch.randn(64, *in_shape, requires_grad=True)
    counts = []
    for layer in (tiled, whole):
        with FlopCounterMode(display=False) as fwd:
            y = layer(x)
        with FlopCounterMode(display=False) as bwd:
            y.sum().backward()
        counts.append((fwd.get_total_flops(), bwd.get_total_flops()))
    assert counts[0] == counts[1] and counts[0][0] > 0


def test_layer_pickled_before_tiling_still_runs():
    import pickle

    layer = NdLinear((6, 8), (12, 10), rank=2)
    state = layer.__dict__.copy()
    for key in ("_text", "tile", "tile_setting"):
        state.pop(key)
    old = NdLinear.__new__(NdLinear)
    old.__setstate__(state)
    x = torch.randn(100, 6, 8)
    torch.testing.assert_close(pickle.loads(pickle.dumps(old))(x), layer(x))
    assert old.tile == layer.tile


def test_automatic_tile_follows_the_dtype():
    layer = NdLinear((24, 32), (48, 64))
    single = layer.tile
    per_row = row_elements(layer.plan().program, (24, 32), [(48, 24), (64, 32)])
    assert single == choose_tile(per_row, 4)
    assert layer.double().tile == choose_tile(per_row, 8) < single
    assert layer.float().tile == single
    fixed = NdLinear((24, 32), (48, 64), tile=40).double()
    assert fixed.tile == 40


def test_dispatched_ops_counts_each_op():
    a = torch.randn(4, 4)
    counts = dispatched_ops(lambda: (a @ a + a) @ a)
    assert counts["aten::mm"] == 2 and counts["aten::add"] == 1


def test_automatic_tiles_leave_batches_of_a_few_tiles_whole_in_inference():
    auto, whole = _pair((6, 8), (12, 10), 1, tile="auto")
    auto.tile = 16  # as if the L2 caches held 16 rows
    fixed, _ = _pair((6, 8), (12, 10), 1, tile=16)
    assert auto.whole_tiles == AUTO_WHOLE_TILES > fixed.whole_tiles == 2
    few = torch.randn(16 * AUTO_WHOLE_TILES, 6, 8, dtype=torch.float64)
    many = torch.randn(16 * AUTO_WHOLE_TILES + 1, 6, 8, dtype=torch.float64)
    calls = "ndcompile::tiled_contract"
    with torch.no_grad():
        assert dispatched_ops(lambda: auto(few))[calls] == 0
        assert dispatched_ops(lambda: auto(many))[calls] == 1
        assert dispatched_ops(lambda: fixed(few))[calls] == 1  # a fixed tile: more than two
        for x in (few, many):
            torch.testing.assert_close(auto(x), whole(x))
    # Training tiles more than two tiles: the recompute holds one tile at a time.
    assert dispatched_ops(lambda: auto(few).sum().backward())[calls] == 1
    assert should_tile(many, 16, AUTO_WHOLE_TILES) and not should_tile(few, 16, AUTO_WHOLE_TILES)


def test_graph_tile_leaves_a_few_tiles_whole_without_gradients():
    layer = NdLinear((24, 32), (48, 64))
    program = layer.plan().program
    shapes = [(48, 24), (64, 32)]
    tile = choose_tile(row_elements(program, (24, 32), shapes), 4)
    like = torch.empty(0)
    with torch.no_grad():
        assert graph_tile(program, (24, 32), shapes, like, AUTO_WHOLE_TILES * tile) == 0
        assert graph_tile(program, (24, 32), shapes, like, AUTO_WHOLE_TILES * tile + 1) == tile
    assert graph_tile(program, (24, 32), shapes, like, 2 * tile) == 0
    assert graph_tile(program, (24, 32), shapes, like, 2 * tile + 1) == tile
