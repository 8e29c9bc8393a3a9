"""Latent-diffusion core: autoencoders, UNet, schedule, samplers, data, training."""

__version__ = "0.1.0"
