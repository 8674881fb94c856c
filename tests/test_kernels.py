"""Tests for ndcompile.kernels: the generated fused two-mode kernel, its build and its use."""

from __future__ import annotations

import subprocess
import warnings

import pytest
import torch

from ndcompile.kernels import build, codegen, kron2
from ndcompile.kernels.codegen import KernelShape, VectorUnit
from ndcompile.layers import execution
from ndcompile.layers.ndlinear import NdLinear

AVX512 = VectorUnit(64, 32, "avx512")
AVX2 = VectorUnit(32, 16, "avx")
NEON = VectorUnit(16, 32, "")

needs_kernels = pytest.mark.skipif(
    build.vector_unit() is None, reason="no C compiler builds the fused kernels here"
)


def shape(d1: int, d2: int, h1: int, h2: int, rank: int = 1, dtype: str = "float32") -> KernelShape:
    return KernelShape(d1, d2, h1, h2, rank, dtype)


# ----------------------------------------------------------------- code generation
@pytest.mark.parametrize("unit", [AVX512, AVX2, NEON])
@pytest.mark.parametrize("cols", [16, 32, 48, 64, 128, 256])
def test_register_blocks_fit_the_register_file(unit: VectorUnit, cols: int) -> None:
    nb, rb = codegen._blocks(cols, unit.lanes("float32"), unit.registers)
    assert (cols // unit.lanes("float32")) % nb == 0
    assert rb * nb + nb + 1 <= unit.registers and rb >= 1


def test_the_order_with_fewer_flops_is_chosen() -> None:
    up = shape(24, 32, 48, 64)  # 768 -> 3072: mode 2 first
    down = shape(48, 64, 24, 32)  # 3072 -> 768: mode 1 first
    assert codegen.kernel_order(up, AVX512) == "21"
    assert codegen.kernel_order(down, AVX512) == "12"
    assert codegen.kernel_flops(down, "12") < codegen.kernel_flops(down, "21")
    # Mode 1 first needs d2 in whole vectors: with d2 = 40 only "21" remains.
    assert codegen.kernel_order(shape(48, 40, 24, 32), AVX512) == "21"


def test_partial_vectors_are_padded_and_large_rows_get_no_kernel() -> None:
    odd = shape(24, 32, 48, 60)  # 60 % 16: padded to 64 columns, mode 2 first only
    assert codegen.padded_columns(odd, AVX512) == 64
    assert codegen.kernel_order(odd, AVX512) == "21"
    assert codegen.kernel_order(shape(48, 64, 24, 60), AVX512) == "21"  # "12" would be cheaper
    assert codegen.kernel_order(shape(24, 32, 48, 20), AVX512) is None  # 32 for 20: too much
    assert codegen.kernel_order(shape(24, 32, 48, 20, dtype="float64"), NEON) == "21"
    assert "memcpy(yb" in codegen.kernel_source(odd, AVX512)
    assert "memcpy(yb" not in codegen.kernel_source(shape(24, 32, 48, 32), AVX512)
    big = shape(256, 128, 256, 256)  # 256x256 or 256x128 floats of scratch
    assert codegen.scratch_elements(big, "12") * 4 > codegen.MAX_SCRATCH_BYTES
    assert codegen.kernel_order(big, AVX512) is None
    with pytest.raises(ValueError, match="no fused kernel order"):
        codegen.kernel_source(big, AVX512)
    with pytest.raises(ValueError, match="dtype"):
        codegen.kernel_source(shape(24, 32, 48, 64, dtype="float16"), AVX512)


@pytest.mark.parametrize("unit", [AVX512, AVX2, NEON])
def test_the_source_names_its_symbol_and_uses_the_unit(unit: VectorUnit) -> None:
    s = shape(10, 18, 7, 32, rank=2)  # d2 = 18: mode 2 first on every unit
    src = codegen.kernel_source(s, unit)
    assert f"void {s.name}(" in src
    assert f"vector_size({unit.bytes})" in src
    assert ("_mm512_stream_ps" in src) == (unit.stream == "avx512")
    # Remainder row blocks (10 % 6 and 7 % 6) get their own micro-kernels.
    assert "mk_4_" in src and "mk_1_" in src


# ----------------------------------------------------------------- numerics
def dense(x: torch.Tensor, layer: NdLinear) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1) @ layer.dense_weight().t()
    if layer.bias is not None:
        flat = flat + layer.bias
    return flat.reshape(x.shape[0], *layer.out_shape)


CASES = [
    ((24, 32), (48, 64), 1),  # the transformer MLP's up projection (order 21)
    ((48, 64), (24, 32), 1),  # its down projection (order 12)
    ((7, 16), (11, 48), 3),  # remainder row blocks, three vectors, rank 3
    ((13, 32), (5, 16), 2),
    ((7, 16), (11, 60), 2),  # 60 columns: padded to whole vectors
    ((28, 32), (64, 76), 1),  # Qwen2-0.5B's MLP, 896 -> 4864 as (28, 32) -> (64, 76)
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("ins", "outs", "rank"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_the_dense_weight(
    dtype: torch.dtype, ins: tuple, outs: tuple, rank: int, bias: bool
) -> None:
    torch.manual_seed(0)
    layer = NdLinear(ins, outs, rank=rank, bias=bias, dtype=dtype)
    x = torch.randn(37, *ins, dtype=dtype)
    with torch.no_grad():
        factors = layer.factor_operands()
        assert kron2.use_fused(x, factors, [layer.bias])
        got = kron2.fused_kron2(x, factors, layer.bias)
        want = dense(x, layer)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    assert got.is_contiguous() and got.shape == (37, *outs)


@needs_kernels
def test_large_results_stream_and_odd_inputs_work(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = NdLinear((8, 16), (8, 32), dtype=torch.float64)
    x = torch.randn(64, 16, 8, dtype=torch.float64).transpose(1, 2)  # not contiguous
    monkeypatch.setattr(kron2, "STREAM_BYTES", 0)  # every result streams
    with torch.no_grad():
        got = kron2.fused_kron2(x, layer.factor_operands(), layer.bias)
        torch.testing.assert_close(got, dense(x.contiguous(), layer))
        empty = kron2.fused_kron2(x[:0], layer.factor_operands(), layer.bias)
    assert empty.shape == (0, 8, 32)


# ----------------------------------------------------------------- when it runs
@needs_kernels
def test_it_runs_only_where_no_gradient_is_taken_on_plain_cpu_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = NdLinear((24, 32), (48, 64))
    x = torch.randn(5, 24, 32)
    f = layer.factor_operands()
    assert not kron2.use_fused(x, f, [layer.bias])  # the parameters record gradients
    with torch.no_grad():
        assert kron2.use_fused(x, f, [layer.bias])
        assert not kron2.use_fused(x.half(), [t.half() for t in f])
        assert not kron2.use_fused(x.to("meta"), [t.to("meta") for t in f])
        assert not kron2.use_fused(x.double(), f)  # mixed dtypes
        assert not kron2.use_fused(x.reshape(5, 24, 2, 16), [*f, f[0]])  # three modes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kron2.use_fused(x, f)
        monkeypatch.setenv("NDCOMPILE_KERNELS", "0")
        assert not kron2.use_fused(x, f)


@needs_kernels
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": "modes"}, {"lowrank": 3}, {"flat": True}, {"tile": 4}, {"rank": 2}],
)
def test_a_layer_takes_the_kernel_in_inference(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict
) -> None:
    calls = []
    real = execution.fused_kron2
    monkeypatch.setattr(execution, "fused_kron2", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = NdLinear((8, 16), (4, 32), **kwargs)
    if layer.mode_biases is not None:
        with torch.no_grad():
            for b in layer.mode_biases:
                b.normal_()
    x = torch.randn(3, 10, 8 * 16) if layer.flat else torch.randn(3, 10, 8, 16)
    with torch.no_grad():
        got = layer(x)
        assert calls
        monkeypatch.setenv("NDCOMPILE_KERNELS", "0")
        want = layer(x)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


TRAINING = [
    ({}, (8, 16), (4, 32)),
    ({"rank": 3}, (8, 16), (4, 32)),
    ({"bias": "modes"}, (8, 16), (4, 32)),
    ({"bias": False, "tile": 8}, (8, 16), (4, 32)),  # tiled: the backward runs per tile
    ({"lowrank": 2, "flat": True}, (8, 16), (4, 32)),
    ({"rank": 2, "tile": 8}, (12, 16), (8, 16)),  # tiled, with the bias's gradient
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("kwargs", "ins", "outs"), TRAINING)
def test_training_through_the_kernel_matches_the_program(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kwargs: dict, ins: tuple, outs: tuple
) -> None:
    calls = []
    real = execution.train_kron2
    monkeypatch.setattr(execution, "train_kron2", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = NdLinear(ins, outs, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    shape = (5, 7, ins[0] * ins[1]) if layer.flat else (5, 7, *ins)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("NDCOMPILE_KERNELS", enabled)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        results.append((y, grads))
    assert len(calls) == 1
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for got, want in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, want, **tol)


@needs_kernels
def test_training_with_frozen_factors_or_without_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = execution.train_kron2
    monkeypatch.setattr(execution, "train_kron2", lambda *a: calls.append(1) or real(*a))
    layer = NdLinear((8, 16), (4, 32))
    for f in layer.factors:
        f.requires_grad_(False)
    x = torch.randn(6, 8, 16)
    layer(x).sum().backward()  # only the bias learns
    assert calls and torch.equal(layer.bias.grad, torch.full((128,), 6.0))
    # recompute=False keeps autograd's own saved intermediates: the planned program.
    plain = NdLinear((8, 16), (4, 32), recompute=False)
    plain(x).sum().backward()
    assert len(calls) == 1 and plain.factors[0].grad is not None


@needs_kernels
def test_double_backward_of_an_untiled_layer_matches_the_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    layer = NdLinear((12, 16), (10, 32), dtype=torch.float64)
    x = torch.randn(8, 12, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("NDCOMPILE_KERNELS", enabled)
        (g,) = torch.autograd.grad(layer(x).square().sum(), [x], create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), [x, *layer.parameters()]))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@needs_kernels
def test_subclasses_and_forward_mode_tangents_keep_the_planned_ops() -> None:
    from torch.autograd import forward_ad
    from torch.testing._internal.two_tensor import TwoTensor

    layer = NdLinear((8, 16), (4, 32), rank=2).requires_grad_(False)
    x = torch.randn(6, 8, 16)
    factors = [TwoTensor(f, 2 * f) for f in layer.factor_operands()]
    assert not kron2.use_fused(x, factors)
    tangent = torch.randn_like(x)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        assert not kron2.use_fused(dual, layer.factor_operands())
        got = forward_ad.unpack_dual(layer(dual)).tangent
    assert got is not None
    want = layer(tangent) - layer.bias.reshape(4, 32)  # the layer is affine in x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_op_without_a_kernel_computes_the_same_contraction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = NdLinear((8, 16), (4, 32), rank=2)
    x = torch.randn(6, 8, 16)
    with torch.no_grad():
        want = dense(x, layer)
        monkeypatch.setenv("NDCOMPILE_KERNELS", "0")  # as on a machine without a compiler
        f1, f2 = layer.factor_operands()
        got = torch.ops.ndcompile.kron2(x, f1, f2, layer.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def captured_graphs(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``module(x)`` compiled by dynamo, and the code of the graph it captured."""
    codes: list[str] = []

    def backend(gm: torch.fx.GraphModule, _: object) -> object:
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(x)
    return out, "\n".join(codes)


@needs_kernels
def test_compiled_inference_calls_the_kernel_op_and_export_does_not() -> None:
    torch.manual_seed(0)
    layer = NdLinear((8, 16), (4, 32), rank=2)
    x = torch.randn(6, 8, 16)
    with torch.no_grad():
        want = layer(x)
        got, code = captured_graphs(layer, x)
        assert "torch.ops.ndcompile.kron2" in code
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        inductor = torch.compile(layer)(x)
        torch.testing.assert_close(inductor, want, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(layer, (x,))
    assert "kron2" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)
    # With gradients the graph runs the planned program (the op has no backward).
    y, code = captured_graphs(layer, x)
    assert "kron2" not in code
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@needs_kernels
def test_a_real_bert_runs_the_kernel_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_models import build as build_model

    import ndcompile

    model, inputs = build_model("bert")
    model.eval()
    converted = ndcompile.convert(model, inputs, mode="fresh", rank=2)
    calls = []
    real, real_train = execution.fused_kron2, execution.train_kron2
    monkeypatch.setattr(execution, "fused_kron2", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = converted(**inputs).last_hidden_state
        monkeypatch.setenv("NDCOMPILE_KERNELS", "0")
        want = converted(**inputs).last_hidden_state
    assert calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Training: the same loss and gradients through the kernel's autograd function.
    monkeypatch.setattr(execution, "train_kron2", lambda *a: calls.append(2) or real_train(*a))
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("NDCOMPILE_KERNELS", enabled)
        converted.zero_grad()
        converted(**inputs).last_hidden_state.square().mean().backward()
        results.append([p.grad.clone() for p in converted.parameters() if p.grad is not None])
    assert 2 in calls and len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- the build
@needs_kernels
def test_built_kernels_are_cached_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    source = "int ndc_cached_answer(void) { return 42; }\n"
    assert build.compile_library(source, "answer").ndc_cached_answer() == 42
    runs = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: runs.append(a) or real(*a, **k))
    assert build.compile_library(source, "answer").ndc_cached_answer() == 42
    assert not [r for r in runs if "-shared" in r[0]]


@needs_kernels
def test_a_source_that_fails_to_compile_warns_once() -> None:
    with pytest.warns(build.KernelBuildWarning, match="did not compile"):
        assert build.compile_library("this is not C\n", "broken") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.compile_library("this is not C\n", "broken") is None


def test_without_a_compiler_layers_run_their_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_compiler", lambda: None)
    build.vector_unit.cache_clear()
    kron2.kron2_function.cache_clear()
    try:
        assert build.vector_unit() is None
        layer = NdLinear((8, 16), (4, 32))
        x = torch.randn(4, 8, 16)
        with torch.no_grad():
            assert not kron2.use_fused(x, layer.factor_operands())
            torch.testing.assert_close(layer(x), dense(x, layer), rtol=1e-5, atol=1e-5)
    finally:
        build.vector_unit.cache_clear()
        kron2.kron2_function.cache_clear()


@needs_kernels
def test_flop_counters_see_the_planned_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    layer = NdLinear((8, 16), (4, 32))
    x = torch.randn(4, 8, 16)
    counts = []
    with torch.no_grad():
        assert kron2.use_fused(x, layer.factor_operands())
        for enabled in ("1", "0"):
            monkeypatch.setenv("NDCOMPILE_KERNELS", enabled)
            with FlopCounterMode(display=False) as counter:
                layer(x)
            counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


# ----------------------------------------------------------------- the backend
def kron2_calls(gm: torch.fx.GraphModule) -> int:
    """How many ``ndcompile::kron2`` calls ``gm`` makes."""
    return sum(node.target is torch.ops.ndcompile.kron2.default for node in gm.graph.nodes)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_backend_calls_the_kernel_in_inference_graphs(dtype: torch.dtype) -> None:
    import ndlinear

    from ndcompile.backends.dynamo import rewrite_dynamo_graph

    from backend_helpers import backend_compile, capture

    torch.manual_seed(0)
    model = ndlinear.NdLinear((8, 16), (4, 32)).to(dtype)
    x = torch.randn(10, 8, 16, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    with torch.no_grad():
        (gm, inputs), *_ = capture(model, x)
        work, report, _ = rewrite_dynamo_graph(gm, inputs)
        assert report.layers[0].status == "inlined" and kron2_calls(work) == 1
        torch.testing.assert_close(backend_compile(model)(x), model(x), **tol)

    # A model that turns gradients on inside its forward records them even when it
    # is called under no_grad: its graph keeps the planned program.
    class Enabled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.nd = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return self.nd(x)

    with torch.no_grad():
        out = backend_compile(Enabled(), inductor=False)(x)
    out.sum().backward()
    # A graph captured for training runs the planned program and has gradients.
    (gm, inputs), *_ = capture(model, x)
    work, _, _ = rewrite_dynamo_graph(gm, inputs)
    assert kron2_calls(work) == 0
    out = backend_compile(model, inductor=False)(x)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_kernels
def test_the_backend_factorizes_into_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from backend_helpers import backend_compile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU())
    x = torch.randn(3, 7, 256)
    outputs, calls = [], []
    real = kron2._run
    monkeypatch.setattr(kron2, "_run", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        for enabled in ("1", "0"):
            monkeypatch.setenv("NDCOMPILE_KERNELS", enabled)
            reports: list = []
            compiled = backend_compile(model, reports, factorize={"rank": 2})
            outputs.append(compiled(x))
            assert reports[-1].layers[0].status == "converted"
            assert len(calls) == 1  # the first, fused, compile only
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_kernel_cache_others_can_write_to_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))
    (tmp_path / "kernels").mkdir(mode=0o777)
    (tmp_path / "kernels").chmod(0o777)
    assert build._kernel_dir() == build._private_dir() != tmp_path / "kernels"
    lib = build.compile_library("int ndc_private(void) { return 7; }\n", "private")
    assert lib.ndc_private() == 7 and not list((tmp_path / "kernels").iterdir())
    (tmp_path / "kernels").chmod(0o700)
    assert build._kernel_dir() == tmp_path / "kernels"


def test_kernels_are_off_outside_linux_and_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build.sys, "platform", "darwin")
    assert not build.kernels_enabled()
    monkeypatch.setattr(build.sys, "platform", "linux")
    assert build.kernels_enabled()
    monkeypatch.setenv("NDCOMPILE_KERNELS", "0")
    assert not build.kernels_enabled()
