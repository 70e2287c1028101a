"""Lab models that take the normalization by name: ``build_model("cnn", norm="gn", ...)``.

Models (see :func:`model_names`; more with :func:`register_model`):

* ``mlp``: ``Linear -> norm -> activation`` per hidden layer, then a linear head. Options:
  ``hidden`` (sizes, default ``(128, 128)``), ``activation`` (``relu``, ``sigmoid``, ``tanh``,
  ``gelu``, ``identity``). Any input shape is flattened.
* ``cnn``: ``conv -> norm -> relu`` blocks (default ``channels=(16, 32, 32)``, kernel 3,
  "same" padding); a 2×2 (or 2) max-pool after every block but the first while the map is at least
  2 wide, so 8×8 digits go 8 -> 4 -> 2 and 32×32 images 32 -> 16 -> 8. Head: global average pool
  + linear (``head="gap"``) or flatten + linear (``head="flatten"``). Images ``(C, H, W)`` use
  conv2d; sequences ``(T, F)`` use conv1d over time with ``F`` input channels.
* ``resnet``: CIFAR-style ResNet (He et al. 2016, section 4.2): depth ``6n + 2`` (option ``depth``,
  default 20), a 3×3 stem of ``width`` channels (default 16), three stages of ``n`` basic blocks
  with ``width``, ``2·width``, ``4·width`` channels (stride 2 at the start of stages 2 and 3,
  1×1 conv + norm shortcut), global average pool, linear head. Works on 8×8 (8 -> 4 -> 2) and
  32×32 images, and on ``(T, F)`` sequences with conv1d.
* ``lstm``: one LSTM layer over a ``(T, F)`` sequence and a linear head on ``h_T``; the norm picks
  the recurrent cell (``none``, ``ln``, ``bn``, ``wn``), see :mod:`normlab.lab.models.recurrent`.
* ``transformer``: a small decoder-only language model (causal self-attention, learned positions),
  Pre-LN, Post-LN or Peri-LN blocks, optional QK-norm, see :mod:`normlab.lab.models.transformer`.
* ``package.module:function``: ``function(norm=..., input_shape=..., num_classes=..., **options)``
  must return an ``nn.Module``. It is responsible for its normalization (use
  :func:`normlab.lab.norms.get_norm`); set ``model.needs_data_init = True`` if it needs
  weight norm's data-dependent init.

Conventions of the built-in models: outputs are ``(N, num_classes)`` logits, or ``(N, 1)`` for
regression (``num_classes == 0``). A conv/linear layer followed by a norm with a learned shift
(bn, gn, ln, in, mobn) has no bias: the norm would remove it. With a weight-norm choice (``wn``,
``wn+mobn``, ``wn+X``) every conv/linear weight, the head's included, is reparametrized by
weight normalization and :func:`needs_data_init` is true: the trainer then runs the
data-dependent init on a batch before training.

Layout: :mod:`~normlab.lab.models.registry` (the registry and :func:`build_model`),
:mod:`~normlab.lab.models.feedforward` (``mlp``, ``cnn``, ``resnet``) and
:mod:`~normlab.lab.models.recurrent` (``lstm``), :mod:`~normlab.lab.models.transformer`
(``transformer``); the model modules register themselves with the
registry, which imports none of them.
"""

from normlab.lab.models import feedforward, recurrent, transformer  # noqa: F401  (register the built-in models)
from normlab.lab.models.feedforward import ACTIVATIONS, CNN, MLP, ResNet
from normlab.lab.models.recurrent import LSTMClassifier
from normlab.lab.models.registry import *  # noqa: F403  (the public API: see registry.__all__)
from normlab.lab.models.registry import __all__ as _registry_api

__all__ = ["ACTIVATIONS", "CNN", "LSTMClassifier", "MLP", "ResNet", *_registry_api]
