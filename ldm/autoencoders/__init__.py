"""ldm.autoencoders"""
