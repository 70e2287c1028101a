"""Small, real-architecture models with torch.nn normalization, for end-to-end measurements.

Each entry builds a model exactly as its library (or paper) defines it, with random weights and
a small width so that a CPU training step takes tens of milliseconds, plus a batch and a loss:

* ``resnet18-bn`` / ``resnet18-gn``: ResNet-18 (He et al. 2016, BasicBlock ×[2,2,2,2]) with
  BatchNorm2d or GroupNorm(8) (Wu & He 2018), width 16, 32×32 images;
* ``convnext``: ConvNeXt-atto-style (Liu et al. 2022): 4×4 patch stem + channels-first
  LayerNorm, blocks of 7×7 depthwise conv → LayerNorm (channels-last) → MLP ×4 → layer scale,
  channels-first LayerNorm before each downsampling (what timm's ``convnext_atto`` does);
* ``vit``: ViT-tiny-style pre-norm encoder (LayerNorm → MHSA, LayerNorm → MLP), patch 4;
* ``bert``, ``gpt2``, ``qwen3``: Hugging Face ``transformers`` models from tiny configs
  (LayerNorm, LayerNorm, and RMSNorm); skipped when transformers is not installed.

No weights are downloaded; everything is seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Workload", "ZOO", "build", "available"]


@dataclass
class Workload:
    """A model, one training batch, and the loss of a training step."""

    name: str
    model: nn.Module
    inputs: tuple
    loss: Callable[[nn.Module, tuple], torch.Tensor]


def _classify(model, inputs):
    x, y = inputs
    return nn.functional.cross_entropy(model(x), y)


def _images(batch: int, side: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=g), torch.randint(0, classes, (batch,), generator=g)


# ----------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18(norm: Callable[[int], nn.Module], width: int = 16, classes: int = 10) -> nn.Module:
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
    cin = width
    for i, blocks in enumerate((2, 2, 2, 2)):
        cout = width * 2**i
        for j in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, norm))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------- ConvNeXt


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm2d``: nn.LayerNorm over C of an (N, C, H, W) tensor (permute, LN, permute)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def convnext(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i > 0:
            layers += [ChannelsFirstLayerNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
        layers += [ConvNeXtBlock(dim) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], classes)]
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------------- ViT


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 96, depth: int = 4, heads: int = 3, patch: int = 4, side: int = 32,
                 classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (side // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


# ----------------------------------------------------------------------------- transformers


def _lm_loss(model, inputs):
    (ids,) = inputs
    return model(input_ids=ids, labels=ids).loss


def _hf(kind: str, batch: int, seq: int = 64):
    import transformers as T

    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=512, max_position_embeddings=256)
    if kind == "bert":
        cfg = T.BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = T.BertForSequenceClassification(cfg)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        return model, (ids, labels), lambda m, i: m(input_ids=i[0], labels=i[1]).loss
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=256,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = T.GPT2LMHeadModel(cfg)
        # transformers 5 cannot map this class name to a loss and warns inside forward, which
        # graph-breaks torch.compile on both sides of the comparison; name the loss explicitly
        model.loss_type = "ForCausalLM"
    else:
        cfg = T.Qwen3Config(**common, num_key_value_heads=2, head_dim=32)
        model = T.Qwen3ForCausalLM(cfg)
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (ids,), _lm_loss


def _vision(factory):
    def build(batch: int):
        return factory(), _images(batch), _classify

    return build


ZOO: dict[str, Callable[[int], tuple]] = {
    "resnet18-bn": _vision(lambda: resnet18(nn.BatchNorm2d)),
    "resnet18-gn": _vision(lambda: resnet18(lambda c: nn.GroupNorm(8, c))),
    "convnext": _vision(convnext),
    "vit": _vision(ViT),
    "bert": lambda batch: _hf("bert", batch),
    "gpt2": lambda batch: _hf("gpt2", batch),
    "qwen3": lambda batch: _hf("qwen3", batch),
}


def available() -> list[str]:
    """Zoo entries whose dependencies import here (the transformers ones need ``transformers``)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [n for n in ZOO if n not in ("bert", "gpt2", "qwen3")]
    return list(ZOO)


def build(name: str, batch: int = 16, seed: int = 0) -> Workload:
    """The seeded workload ``name`` with torch.nn normalization layers (train mode)."""
    if name not in ZOO:
        raise ValueError(f"model: expected one of {sorted(ZOO)}, got {name!r}")
    torch.manual_seed(seed)
    model, inputs, loss = ZOO[name](batch)
    return Workload(name, model.train(), inputs, loss)
