"""Property-based tests of ``convert`` on random small models (hypothesis).

Random stacks of Linear / ReLU / flatten / unflatten / permute / NdLinear (ours and
the reference package's) with random shapes, checked against independent oracles:

- ``exact`` mode computes the original function (float64, 1e-9) at several batch sizes;
- ``fresh`` mode keeps output shapes, lists every Linear, equals the dense form of its
  own layers, and trains (the loss falls over a few Adam steps);
- ``factorize`` at full rank (two modes, ``rank = min(h1*d1, h2*d2)``) is exact.

Examples are generated deterministically (``derandomize=True``, no database). Run with
``-s`` to print how many examples each property ran.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ndcompile import convert

from random_models import OpSpec, build_random_model
from reliability_models import dense_equivalent, isolate_ndcompile_env, linear_names, rel_error

EXAMPLES = {"exact": 150, "fresh": 80, "factorize": 60, "untouched": 30}
RAN: Counter[str] = Counter()
#: Layers rewritten across all examples (so a property cannot pass vacuously).
REWRITTEN: Counter[str] = Counter()

PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in isolate_ndcompile_env(tmp_path_factory.mktemp("cache")).items():
            mp.setenv(key, value)
        yield


# ------------------------------------------------------------------- strategies


def _divisors(n: int) -> list[int]:
    return [a for a in range(2, n) if n % a == 0]


#: Ops that only move or regroup values (shared by both model strategies).
LAYOUT_OPS = ("relu", "flatten", "unflatten", "permute")


def _layout_op(draw: st.DrawFn, op: str, shape: list[int], spec: list[OpSpec]) -> list[int]:
    """Append a relu/flatten/unflatten/permute op to ``spec``; returns the new shape."""
    if op == "relu":
        spec.append(("relu",))
    elif op == "flatten":
        spec.append(("flatten",))
        shape = [math.prod(shape)]
    elif op == "unflatten":
        a = draw(st.sampled_from(_divisors(shape[-1])))
        spec.append(("unflatten", (a, shape[-1] // a)))
        shape = [*shape[:-1], a, shape[-1] // a]
    else:
        perm = draw(st.permutations(range(len(shape))))
        spec.append(("permute", tuple(perm)))
        shape = [shape[p] for p in perm]
    return shape


@st.composite
def exact_specs(draw: st.DrawFn) -> tuple[tuple[int, ...], list[OpSpec]]:
    """Feature shape and ops of a random model with NdLinear layers to inline."""
    features = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    shape = list(features)
    spec: list[OpSpec] = []
    for _ in range(draw(st.integers(1, 5))):
        ops = ["linear", "relu", "ndlinear", "ndlinear", "reference"]
        if len(shape) >= 2:
            ops += ["flatten", "permute"]
        if len(shape) < 4 and _divisors(shape[-1]) and math.prod(shape) <= 48:
            ops.append("unflatten")
        op = draw(st.sampled_from(ops))
        if op == "linear":
            out = draw(st.integers(1, 6))
            spec.append(("linear", shape[-1], out, draw(st.booleans())))
            shape[-1] = out
        elif op in LAYOUT_OPS:
            shape = _layout_op(draw, op, shape, spec)
        elif op == "ndlinear":
            k = draw(st.integers(1, len(shape)))
            outs = [draw(st.integers(1, 4)) for _ in range(k)]
            rank = draw(st.integers(1, 2))
            bias = draw(st.sampled_from([True, False, "modes"] if rank == 1 else [True, False]))
            spec.append(("ndlinear", tuple(shape[-k:]), tuple(outs), rank, bias))
            shape[-k:] = outs
        else:
            outs = [draw(st.integers(1, 4)) for _ in shape]
            spec.append(("reference", tuple(shape), tuple(outs), draw(st.booleans())))
            shape = outs
    return features, spec


@st.composite
def fresh_specs(draw: st.DrawFn) -> tuple[tuple[int, ...], list[OpSpec]]:
    """Feature shape and ops of a random model (dense and NdLinear layers) ending in a Linear."""
    sizes = st.sampled_from([4, 6, 8, 9, 12, 16])
    modes = st.sampled_from([2, 3, 4])
    features = tuple(draw(st.lists(st.sampled_from([2, 4, 6, 8]), min_size=1, max_size=3)))
    shape = list(features)
    spec: list[OpSpec] = []
    for _ in range(draw(st.integers(0, 4))):
        ops = ["linear", "linear", "relu", "ndlinear", "reference"]
        if len(shape) >= 2:
            ops += ["flatten", "permute"]
        if len(shape) < 3 and _divisors(shape[-1]):
            ops.append("unflatten")
        op = draw(st.sampled_from(ops))
        if op == "linear":
            out = draw(sizes)
            spec.append(("linear", shape[-1], out, draw(st.booleans())))
            shape[-1] = out
        elif op in LAYOUT_OPS:
            shape = _layout_op(draw, op, shape, spec)
        elif op == "ndlinear":
            k = draw(st.integers(1, len(shape)))
            outs = [draw(modes) for _ in range(k)]
            spec.append(("ndlinear", tuple(shape[-k:]), tuple(outs), 1, draw(st.booleans())))
            shape[-k:] = outs
        else:
            outs = [draw(modes) for _ in shape]
            spec.append(("reference", tuple(shape), tuple(outs), draw(st.booleans())))
            shape = outs
    spec.append(("linear", shape[-1], draw(sizes), True))
    return features, spec


# ------------------------------------------------------------------- properties


@settings(PROPERTY, max_examples=EXAMPLES["exact"])
@given(case=exact_specs(), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_exact_mode_equals_original(
    case: tuple[tuple[int, ...], list[OpSpec]], batch: int, seed: int
) -> None:
    RAN["exact"] += 1
    features, spec = case
    torch.manual_seed(seed)
    model = build_random_model(spec).double()
    x = torch.randn(batch, *features, dtype=torch.float64)
    gm = convert(model, x, mode="exact")
    REWRITTEN["exact"] += len(gm.report.converted)
    for b in (batch, batch + 2):
        inp = torch.randn(b, *features, dtype=torch.float64)
        assert rel_error(model(inp), gm(inp)) <= 1e-9, (spec, b)


@settings(PROPERTY, max_examples=EXAMPLES["fresh"])
@given(case=fresh_specs(), batch=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_fresh_mode_keeps_shapes_and_trains(
    case: tuple[tuple[int, ...], list[OpSpec]], batch: int, seed: int
) -> None:
    RAN["fresh"] += 1
    features, spec = case
    torch.manual_seed(seed)
    model = build_random_model(spec).double()
    x = torch.randn(batch, *features, dtype=torch.float64)
    gm = convert(model, x, mode="fresh", min_features=4)
    report = gm.report
    REWRITTEN["fresh"] += len(report.converted)
    assert {e.name for e in report.layers} == linear_names(model)
    assert all(e.reason for e in report.skipped)
    for b in (batch, batch + 3):
        inp = torch.randn(b, *features, dtype=torch.float64)
        out = gm(inp)
        assert out.shape == model(inp).shape
        assert rel_error(dense_equivalent(model, gm)(inp), out) <= 1e-9, spec

    target = torch.randn_like(gm(x))
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = (gm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (spec, losses)


@settings(PROPERTY, max_examples=EXAMPLES["factorize"])
@given(
    modes=st.tuples(*[st.integers(1, 5)] * 4),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    bias=st.booleans(),
    relu_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factorize_at_full_rank_is_exact(
    modes: tuple[int, int, int, int], lead: list[int], bias: bool, relu_first: bool, seed: int
) -> None:
    RAN["factorize"] += 1
    d1, d2, h1, h2 = modes
    torch.manual_seed(seed)
    spec: list[OpSpec] = [("relu",)] if relu_first else []
    spec.append(("linear", d1 * d2, h1 * h2, bias))
    model = build_random_model(spec).double()
    fc = str(len(spec) - 1)
    x = torch.randn(*lead, d1 * d2, dtype=torch.float64)
    rank = min(h1 * d1, h2 * d2)
    gm = convert(
        model,
        x,
        mode="factorize",
        rank=rank,
        shapes={fc: ((d1, d2), (h1, h2))},
        skip_larger=False,
        min_features=1,
    )
    entry = gm.report.layer(fc)
    assert entry.status == "converted" and entry.rank == rank
    REWRITTEN["factorize"] += 1
    assert rel_error(model(x), gm(x)) <= 1e-9, (modes, rank)
    other = torch.randn(*[n + 2 for n in lead], d1 * d2, dtype=torch.float64)
    assert rel_error(model(other), gm(other)) <= 1e-9


UNTOUCHED_MODES = {
    "fresh": {},
    "factorize": {"rank": 1, "skip_larger": False},
    "adapter": {"zero_init": False},
    "exact": {},
}


@settings(PROPERTY, max_examples=EXAMPLES["untouched"])
@given(
    case=fresh_specs(),
    mode=st.sampled_from(sorted(UNTOUCHED_MODES)),
    output=st.sampled_from(["auto", "module"]),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_convert_leaves_the_users_model_untouched(
    case: tuple[tuple[int, ...], list[OpSpec]], mode: str, output: str, train: bool, seed: int
) -> None:
    RAN["untouched"] += 1
    features, spec = case
    torch.manual_seed(seed)
    model = build_random_model(spec).double().train(train)
    calls: list[int] = []
    hooked = list(model.modules())[seed % len(list(model.modules()))]
    hooked.register_forward_hook(lambda m, i, o: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: (p, p.requires_grad) for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    x = torch.randn(2, *features, dtype=torch.float64)
    convert(model, x, mode=mode, output=output, min_features=4, **UNTOUCHED_MODES[mode])
    REWRITTEN["untouched"] += 1
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items()), spec
    assert {n: (p, p.requires_grad) for n, p in model.named_parameters()} == params
    assert [m.training for m in model.modules()] == flags
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks


def test_hypothesis_example_count() -> None:
    """At least 200 examples ran across the properties (when all of them ran)."""
    if set(RAN) != set(EXAMPLES):
        pytest.skip(f"only some properties ran in this session: {dict(RAN)}")
    total = sum(RAN.values())
    print(
        f"\nhypothesis examples run: {dict(RAN)} total={total}; layers rewritten: {dict(REWRITTEN)}"
    )
    assert total >= 200
    assert all(REWRITTEN[name] >= RAN[name] // 2 for name in EXAMPLES), dict(REWRITTEN)
