"""ldm.unet"""
