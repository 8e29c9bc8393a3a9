"""Frequency-Augmented VAE: FFT frequency module and LR-conditioned fuse layers."""
