"""ProjectedAttention computes what nn.MultiheadAttention computes, with separate projections."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ndcompile.layers.attention import ProjectedAttention

E, HEADS, L, S, B = 16, 4, 5, 7, 3
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

#: (batch_first, bias, add_bias_kv, add_zero_attn, kdim)
LAYOUTS = list(
    itertools.product([False, True], [True, False], [False, True], [False, True], [None, 10])
)


def _inputs(batch_first: bool, kdim: int | None, dtype: torch.dtype, self_attention: bool):
    def shaped(n: int, f: int) -> torch.Tensor:
        return torch.randn(*((B, n, f) if batch_first else (n, B, f)), dtype=dtype)

    q = shaped(L, E)
    if self_attention:
        return q, q, q
    return q, shaped(S, kdim or E), shaped(S, kdim or E)


def _masks(src: int, dtype: torch.dtype) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    padding = torch.rand(B, src, generator=gen) > 0.7
    padding[:, 0] = False  # every query attends to at least one key
    blocked = torch.rand(L, src, generator=gen) > 0.8
    blocked[:, 0] = False
    additive = torch.randn(L, src, generator=gen, dtype=dtype)
    per_head = torch.randn(B * HEADS, L, src, generator=gen, dtype=dtype)
    options = [
        {},
        {"need_weights": False},
        {"key_padding_mask": padding},
        {"attn_mask": blocked, "need_weights": False},
        {"attn_mask": additive, "key_padding_mask": padding.to(dtype) * -1e4},
        {"attn_mask": per_head},
        {"average_attn_weights": False},
    ]
    if src == L:
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
        options.append({"attn_mask": causal, "is_causal": True, "need_weights": False})
        options.append({"attn_mask": causal, "is_causal": True})
    return options


def _grad_inputs(q, k, v):
    """Leaf copies that keep the ``query is key is value`` identity of self-attention."""
    q2 = q.clone().requires_grad_(True)
    if k is q:
        return q2, q2, q2
    return q2, k.clone().requires_grad_(True), v.clone().requires_grad_(True)


def _assert_same(mha: nn.Module, new: nn.Module, q, k, v, dtype, **opts) -> None:
    tol = TOL[dtype]
    qa, ka, va = _grad_inputs(q, k, v)
    qb, kb, vb = _grad_inputs(q, k, v)
    want, want_w = mha(qa, ka, va, **opts)
    got, got_w = new(qb, kb, vb, **opts)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert (want_w is None) == (got_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, atol=tol, rtol=tol)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for a, b in zip((qa, ka, va), (qb, kb, vb), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=10 * tol, rtol=10 * tol)
    for name, p in mha.named_parameters():
        if name == "in_proj_weight":
            mine = torch.cat([getattr(new, f"{x}_proj").weight.grad for x in "qkv"])
        elif name == "in_proj_bias":
            mine = torch.cat([getattr(new, f"{x}_proj").bias.grad for x in "qkv"])
        elif name.endswith("_proj_weight"):
            mine = getattr(new, name[:6]).weight.grad
        else:
            mine = new.get_parameter(name).grad
        torch.testing.assert_close(mine, p.grad, atol=10 * tol, rtol=10 * tol)
    mha.zero_grad()
    new.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch_first", "bias", "bias_kv", "zero_attn", "kdim"), LAYOUTS)
def test_matches_multihead_attention(dtype, batch_first, bias, bias_kv, zero_attn, kdim) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        E,
        HEADS,
        bias=bias,
        add_bias_kv=bias_kv,
        add_zero_attn=zero_attn,
        kdim=kdim,
        vdim=kdim,
        batch_first=batch_first,
        dtype=dtype,
    )
    new = ProjectedAttention.from_multihead(mha)
    for self_attention in [True, False] if kdim is None else [False]:
        q, k, v = _inputs(batch_first, kdim, dtype, self_attention)
        src = L if self_attention else S
        for opts in _masks(src, dtype):
            mask = opts.get("attn_mask")
            if (bias_kv or zero_attn) and mask is not None and mask.dim() == 3:
                continue  # the appended key has no column in a per-head mask
            _assert_same(mha, new, q, k, v, dtype, **opts)


def test_unbatched_inputs() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, dtype=torch.float64)
    new = ProjectedAttention.from_multihead(mha)
    x = torch.randn(L, E, dtype=torch.float64)
    _assert_same(mha, new, x, x, x, torch.float64)
    _assert_same(mha, new, x, x, x, torch.float64, key_padding_mask=torch.tensor([False] * L))


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_draws_the_same_mask(need_weights: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.3, batch_first=True).train()
    new = ProjectedAttention.from_multihead(mha)
    assert new.training
    x = torch.randn(B, L, E)
    torch.manual_seed(5)
    want = mha(x, x, x, need_weights=need_weights)[0]
    torch.manual_seed(5)
    got = new(x, x, x, need_weights=need_weights)[0]
    torch.testing.assert_close(got, want)
    new.eval()
    assert not torch.allclose(new(x, x, x)[0], got)  # no dropout in eval


def test_copies_weights_and_trainability() -> None:
    mha = nn.MultiheadAttention(E, HEADS, add_bias_kv=True)
    mha.in_proj_weight.requires_grad_(False)
    new = ProjectedAttention.from_multihead(mha)
    assert not any(getattr(new, f"{x}_proj").weight.requires_grad for x in "qkv")
    assert all(getattr(new, f"{x}_proj").bias.requires_grad for x in "qkv")
    assert new.out_proj.weight.requires_grad and new.bias_k.requires_grad
    with torch.no_grad():
        new.q_proj.weight.add_(1.0)
        new.bias_k.add_(1.0)
    # copies: the original is untouched
    assert not torch.equal(new.q_proj.weight, mha.in_proj_weight[:E])
    assert not torch.equal(new.bias_k, mha.bias_k)
    assert new.in_proj_weight is None and new.in_proj_bias is None
    assert "in_proj_weight" not in dict(new.named_parameters())
    assert "embed_dim=16, num_heads=4" in repr(new)


def test_transformer_fast_paths_are_not_taken() -> None:
    """An encoder in eval under no_grad would run fused kernels on in_proj_weight."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True).eval()
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(B, L, E)
    with torch.no_grad():
        want = encoder(x)
        for block in encoder.layers:
            block.self_attn = ProjectedAttention.from_multihead(block.self_attn)
        torch.testing.assert_close(encoder(x), want, atol=1e-5, rtol=1e-5)
        # The projections are what runs: changing one changes the output.
        encoder.layers[0].self_attn.v_proj.weight.mul_(2.0)
        assert not torch.allclose(encoder(x), want, atol=1e-3)


def test_bad_masks_raise_like_multihead_attention() -> None:
    new = ProjectedAttention.from_multihead(nn.MultiheadAttention(E, HEADS))
    x = torch.randn(L, B, E)
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        new(x, x, x, attn_mask=torch.zeros(L, L + 1))
    with pytest.raises(RuntimeError, match="3D attn_mask"):
        new(x, x, x, attn_mask=torch.zeros(2, L, L))
    with pytest.raises(RuntimeError, match="is_causal"):
        new(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="divisible"):
        ProjectedAttention(*[nn.Identity()] * 4, embed_dim=10, num_heads=4)
