"""The shared core: statistics over some axes, normalize, affine — and backend dispatch."""

from normlab.core.dispatch import available_backends, register_backend, resolve, use_backend

__all__ = ["available_backends", "register_backend", "resolve", "use_backend"]
