"""Converters from the official release's constructor parameters to our configs.

The official code (tencent-ailab/Frequency_Aug_VAE_MoESR, CompVis/latent-diffusion)
builds its networks from keyword arguments such as ``ddconfig`` or
``model_channels``. A converter turns ``(class name, kwargs)`` into our
``{target, params}`` config, so that a model described in the official naming
(e.g. a fixture's ``config.json``) is built by our code. Packages register one
converter per official class name with :func:`register_official`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ldm.registry import Registry

OFFICIAL_CONVERTERS = Registry("official class")
register_official = OFFICIAL_CONVERTERS.register

Converter = Callable[..., dict[str, Any]]


def config_from_official(cls: str, params: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Our ``{target, params}`` config for official class ``cls`` built with ``params``.

    ``extra`` carries facts that the official constructor does not take but the
    architecture needs (e.g. the number of FFN experts, which the release hard-codes).
    """
    converter: Converter = OFFICIAL_CONVERTERS.lookup(cls)
    return converter(dict(params), **extra)


def model_from_official(cls: str, params: Mapping[str, Any], **extra: Any):
    """Instantiate our model for official class ``cls`` (random init)."""
    from ldm.config import instantiate

    return instantiate(config_from_official(cls, params, **extra))
