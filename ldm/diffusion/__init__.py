"""ldm.diffusion"""
