"""``nn.MultiheadAttention`` with its projections as separate layers, so each can be converted.

``nn.MultiheadAttention`` keeps the query, key and value projections in one fused
parameter (``in_proj_weight``, or ``q/k/v_proj_weight``) that its forward hands to
``F.multi_head_attention_forward``: there is no Linear module to replace.
:class:`ProjectedAttention` computes the same function with four child layers,
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` (``nn.Linear`` until converted),
and the same forward signature and result, so that module surgery can replace each
projection like any other Linear. Built with :meth:`ProjectedAttention.from_multihead`
it matches the original to floating-point rounding, forward and backward, in
training (dropout aside) and in eval, with every mask option.

It never takes PyTorch's fused fast paths (``in_proj_weight`` is ``None``), neither
its own nor those of ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder``, which
would read the fused weights and bypass the projections.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProjectedAttention"]


def _linear_like(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight``/``bias``, trainable as they are."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None and bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(weight.requires_grad)
    if layer.bias is not None and bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)
    return layer


def _copy_parameter(param: Tensor | None) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)


def _sources(mha: nn.MultiheadAttention) -> list[Tensor]:
    """The parameter each of the query, key and value weights is read from."""
    if mha._qkv_same_embed_dim:
        return [cast(Tensor, mha.in_proj_weight)] * 3
    return [cast(Tensor, getattr(mha, f"{p}_proj_weight")) for p in "qkv"]


def _as_trainable(part: Tensor | None, source: Tensor | None) -> Tensor | None:
    """``part`` detached, flagged trainable when ``source`` is."""
    if part is None or source is None:
        return None
    return part.detach().requires_grad_(source.requires_grad)


class ProjectedAttention(nn.Module):
    """Multi-head attention whose four projections are child layers.

    Attributes mirror ``nn.MultiheadAttention`` (``embed_dim``, ``kdim``, ``vdim``,
    ``num_heads``, ``head_dim``, ``dropout``, ``batch_first``, ``bias_k``, ``bias_v``,
    ``add_zero_attn``); ``in_proj_weight`` and ``in_proj_bias`` are ``None``.

    Args:
        q_proj: ``embed_dim -> embed_dim`` layer for the query.
        k_proj: ``kdim -> embed_dim`` layer for the key.
        v_proj: ``vdim -> embed_dim`` layer for the value.
        out_proj: ``embed_dim -> embed_dim`` layer for the output.
        embed_dim: Model width.
        num_heads: Attention heads (``embed_dim`` must be divisible by it).
        kdim: Key features (default ``embed_dim``).
        vdim: Value features (default ``embed_dim``).
        dropout: Dropout probability on the attention weights (training only).
        batch_first: Inputs are ``(batch, seq, feature)`` instead of ``(seq, batch, feature)``.
        bias_k: Learned key appended to every sequence ``(1, 1, embed_dim)``, or None.
        bias_v: Learned value appended with it, or None.
        add_zero_attn: Append a zero key and value to every sequence.
    """

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        *,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        batch_first: bool = False,
        bias_k: nn.Parameter | None = None,
        bias_v: nn.Parameter | None = None,
        add_zero_attn: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if (bias_k is None) != (bias_v is None):
            raise ValueError("bias_k and bias_v are given together or not at all")
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        # Read by nn.TransformerEncoderLayer/nn.TransformerEncoder to choose their fused
        # fast paths; these values rule them out.
        self._qkv_same_embed_dim = False
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        self.bias_k = bias_k
        self.bias_v = bias_v
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.out_proj = out_proj

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> ProjectedAttention:
        """The same attention as ``mha``, with copies of its weights in four ``nn.Linear``.

        Args:
            mha: The attention to copy (not modified).

        Returns:
            A module in ``mha``'s training mode computing what ``mha`` computes.
        """
        e = mha.embed_dim
        sources = _sources(mha)
        weights = list(sources[0].split(e)) if mha._qkv_same_embed_dim else sources
        bias = cast(Tensor | None, mha.in_proj_bias)
        biases: list[Tensor | None] = [None] * 3 if bias is None else list(bias.split(e))
        # Slices of a parameter are not leaves: their trainability is the parameter's.
        q_proj, k_proj, v_proj = (
            _linear_like(w.detach().requires_grad_(src.requires_grad), _as_trainable(b, bias))
            for w, b, src in zip(weights, biases, sources, strict=True)
        )
        out = mha.out_proj
        new = cls(
            q_proj,
            k_proj,
            v_proj,
            _linear_like(out.weight, out.bias),
            embed_dim=e,
            num_heads=mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            bias_k=_copy_parameter(mha.bias_k),
            bias_v=_copy_parameter(mha.bias_v),
            add_zero_attn=mha.add_zero_attn,
        )
        return new.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``: same arguments, same results."""
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``F.multi_head_attention_forward`` on ``(seq, batch, feature)`` inputs."""
        heads = self.num_heads
        shape_check = F._mha_shape_check  # type: ignore[attr-defined]
        is_batched = shape_check(query, key, value, key_padding_mask, attn_mask, heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"expected query features {self.embed_dim}, got {embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key's sequence and batch dims {tuple(key.shape[:2])} do not match "
                f"value's {tuple(value.shape[:2])}"
            )
        src_len = key.shape[0]
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        # forward() made both masks canonical (float or None) already.
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        attn_mask = self._attn_mask_3d(attn_mask, tgt_len, src_len, bsz)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * heads, self.head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, self.head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, self.head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, self.head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(
                    f"expected key_padding_mask of shape {(bsz, src_len)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            padding = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = self._weighted(q, k, v, attn_mask, dropout_p, is_causal)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out, weights = self._fused(q, k, v, attn_mask, dropout_p, is_causal, bsz), None
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _attn_mask_3d(
        self, attn_mask: Tensor | None, tgt_len: int, src_len: int, bsz: int
    ) -> Tensor | None:
        """A 2-D ``(L, S)`` mask as ``(1, L, S)``; a 3-D one checked against ``(B*H, L, S)``."""
        if attn_mask is None:
            return None
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
            return attn_mask.unsqueeze(0)
        if attn_mask.dim() == 3:
            expected = (bsz * self.num_heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {expected}."
                )
            return attn_mask
        raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    @staticmethod
    def _weighted(
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool
    ) -> tuple[Tensor, Tensor]:
        """Attention with its weights: ``(B*H, L, Dh)`` output and ``(B*H, L, S)`` weights."""
        if is_causal and mask is None:
            raise RuntimeError("is_causal needs attn_mask when need_weights=True")
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        kt = k.transpose(-2, -1)
        scores = torch.bmm(q_scaled, kt) if mask is None else torch.baddbmm(mask, q_scaled, kt)
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.bmm(weights, v), weights

    def _fused(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        dropout_p: float,
        is_causal: bool,
        bsz: int,
    ) -> Tensor:
        """``scaled_dot_product_attention`` on the heads; ``(B*H, L, Dh)`` output."""
        heads, src_len = self.num_heads, k.shape[1]
        if mask is not None:
            if mask.size(0) == 1 and mask.dim() == 3:
                mask = mask.unsqueeze(0)
            else:
                mask = mask.view(bsz, heads, -1, src_len)
        out = F.scaled_dot_product_attention(
            q.view(bsz, heads, q.shape[1], self.head_dim),
            k.view(bsz, heads, src_len, self.head_dim),
            v.view(bsz, heads, src_len, self.head_dim),
            mask,
            dropout_p,
            is_causal,
        )
        return out.reshape(bsz * heads, out.shape[2], self.head_dim)

    def extra_repr(self) -> str:
        """Heads and widths, as ``nn.MultiheadAttention`` would show them."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
            f"vdim={self.vdim}, batch_first={self.batch_first}"
        )
