"""The lab's ``transformer``: a small decoder-only language model whose norm is chosen by name.

``build_model("transformer", norm="rms", input_shape=(T,), num_classes=V, placement="pre")``
builds token embedding + learned positional embedding, ``n_layers`` blocks of causal
multi-head self-attention and a GELU MLP (``mlp_ratio·d_model`` hidden units), and a linear
head over the vocabulary. Where the norm goes (``placement``):

* ``"pre"`` (Pre-LN, Xiong et al. 2020): ``x ← x + Attn(N₁(x))``, ``x ← x + MLP(N₂(x))``, and
  a final norm before the head;
* ``"post"`` (Post-LN, the original Transformer): ``x ← N₁(x + Attn(x))``,
  ``x ← N₂(x + MLP(x))``; no final norm (the last block's output is normalized already);
* ``"peri"`` (Peri-LN, Kim et al. 2025): ``x ← x + N₁'(Attn(N₁(x)))``, the same around the MLP,
  and a final norm: each sub-layer's input *and* output are normalized.

``qk_norm`` (a norm name, or ``None``): queries and keys are normalized per head over the head
dimension before the dot product (QK-layernorm, Dehghani et al. 2023; Wortsman et al. 2023).

Norms: ``none``, ``ln``, ``rms``, ``dyt``, ``derf`` (any name whose layer acts on each token's
feature vector alone; a norm with batch statistics, such as ``bn``, would let a position see the
future through the batch statistics and is rejected). Every norm layer acts on the last
dimension of ``(N, T, d_model)`` (or ``(N, heads, T, d_head)`` for QK-norm).

Input: ``(N, T)`` integer tokens (or ``(N, T, 1)`` codes as floats, as the ``chars`` data set
gives them), ``T ≤ context``. Output: ``(N, T, V)`` logits (``head="lm"``, every position
predicts the next token) or ``(N, V)`` for the last position only (``head="last"``, the shape
the lab's classification loop expects). Initialization as GPT-2: normal(0, 0.02) weights, zero
biases, the residual projections scaled by ``1/sqrt(2·n_layers)``. ``embed_scale`` multiplies
the embeddings (default 1): LN and RMSNorm do not see their scale, but DyT/Derf (``tanh(αx)``
with ``α₀ = 0.5``) and no norm pass it on, and at std 0.02 the logits of a DyT model barely
depend on the input at initialization (``√d_model`` is the usual remedy).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab._checks import check_positive_int
from normlab.lab.models.registry import register_model
from normlab.lab.norms import NormSpec, get_norm

__all__ = ["PLACEMENTS", "TOKEN_NORMS", "Block", "CausalSelfAttention", "Transformer"]

PLACEMENTS: tuple[str, ...] = ("pre", "post", "peri")
#: Norms that act on each token alone (causal by construction).
TOKEN_NORMS: tuple[str, ...] = ("none", "ln", "rms", "dyt", "derf")


def _token_norm(name: str, what: str) -> NormSpec:
    if name not in TOKEN_NORMS:
        raise ValueError(
            f"{what}: expected one of {list(TOKEN_NORMS)} (a per-token norm: batch statistics "
            f"would leak future tokens), got {name!r}"
        )
    return get_norm(name)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, with optional per-head QK-norm.

    ``softmax(N_q(q) N_k(k)ᵀ / sqrt(d_head) + causal mask) v`` per head, then an output
    projection; ``N_q``/``N_k`` are the identity without ``qk_norm``.
    """

    def __init__(self, d_model: int, n_heads: int, qk_norm: NormSpec | None) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: {n_heads} must divide d_model {d_model}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.q_norm = qk_norm.make(self.d_head, "linear") if qk_norm else nn.Identity()
        self.k_norm = qk_norm.make(self.d_head, "linear") if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # over d_head, for each (sample, head, position)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """One transformer block; ``placement`` says where its norms go (module docstring)."""

    def __init__(
        self, spec: NormSpec, d_model: int, n_heads: int, mlp_ratio: int, placement: str,
        qk_norm: NormSpec | None,
    ) -> None:
        super().__init__()
        self.placement = placement
        self.attn = CausalSelfAttention(d_model, n_heads, qk_norm)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.norm1 = spec.make(d_model, "sequence")
        self.norm2 = spec.make(d_model, "sequence")
        if placement == "peri":
            self.norm1_out = spec.make(d_model, "sequence")
            self.norm2_out = spec.make(d_model, "sequence")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if self.placement == "post":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.norm1_out(self.attn(self.norm1(x)))
        return x + self.norm2_out(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Decoder-only character/token language model (see the module docstring)."""

    def __init__(
        self,
        spec: NormSpec,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        context: int | None = None,
        placement: str = "pre",
        qk_norm: str | None = None,
        head: str = "lm",
        embed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _token_norm(spec.name, "norm")
        for name, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
                            ("mlp_ratio", mlp_ratio)):
            check_positive_int(value, name)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {list(PLACEMENTS)}, got {placement!r}")
        if head not in ("lm", "last"):
            raise ValueError(f"head: expected 'lm' or 'last', got {head!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes: a language model needs a vocabulary of >= 2 tokens, got {num_classes}")
        context = int(input_shape[0]) if context is None else context
        check_positive_int(context, "context")
        if input_shape[0] > context:
            raise ValueError(f"input_shape: sequences of {input_shape[0]} tokens exceed context {context}")
        qk = _token_norm(qk_norm, "qk_norm") if qk_norm is not None else None
        if qk is not None and qk.name == "none":
            qk = None
        if not (isinstance(embed_scale, (int, float)) and embed_scale > 0 and math.isfinite(embed_scale)):
            raise ValueError(f"embed_scale: expected a finite number > 0, got {embed_scale!r}")
        self.vocab_size, self.context, self.placement, self.head_kind = num_classes, context, placement, head
        self.embed_scale = float(embed_scale)
        self.tok = nn.Embedding(num_classes, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            Block(spec, d_model, n_heads, mlp_ratio, placement, qk) for _ in range(n_layers)
        )
        self.norm_f = spec.make(d_model, "sequence") if placement != "post" else nn.Identity()
        self.head = nn.Linear(d_model, num_classes)
        self._init(n_layers)

    def _init(self, n_layers: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # residual branches: their sum over layers keeps its scale
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[-1] == 1:  # codes as floats, (N, T, 1): the chars data set
            x = x.squeeze(-1)
        if x.dim() != 2:
            raise ValueError(f"x: expected (N, T) tokens or (N, T, 1) codes, got shape {tuple(x.shape)}")
        if x.shape[1] > self.context:
            raise ValueError(f"x: {x.shape[1]} tokens exceed the context of {self.context}")
        idx = x.long() if x.is_floating_point() else x
        h = self.embed_scale * (self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm_f(h))
        return logits if self.head_kind == "lm" else logits[:, -1]


def _build(spec: NormSpec, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    return Transformer(spec, input_shape, num_classes, **options)


register_model("transformer", _build)
