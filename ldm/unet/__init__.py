"""The latent-diffusion UNet with optional FFN-MoE layers (SS-MoE stage experts).

Importing this package registers the ``unet`` config target and the official-class
converters for ``UNetModel`` and ``UNetModelWithFFNMoe``.
"""

from ldm.unet import official  # noqa: F401  (registers the converters)
from ldm.unet.ffn_moe import FFNMoE, chunk_sizes
from ldm.unet.layers import AttentionBlock, ResBlock, timestep_embedding
from ldm.unet.unet import UNetModel

__all__ = ["AttentionBlock", "FFNMoE", "ResBlock", "UNetModel", "chunk_sizes", "timestep_embedding"]
