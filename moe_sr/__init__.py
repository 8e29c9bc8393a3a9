"""Sampling-space mixture of experts and the 8x super-resolution pipeline."""
