"""Frequency-Augmented VAE: FFT frequency module and LR-conditioned fuse layers.

Public entry points: :func:`load_released` (released ``fa_vae.pth`` files), the models
:class:`~fa_vae.model.FAVQModel` (``fa_vae_vq_f4``) and :class:`~fa_vae.model.FAKLModel`
(``fa_vae_kl_f8``), presets ``configs/fa_vae/*.yaml``.
"""

from fa_vae.released import identify, load_released

__all__ = ["identify", "load_released"]
