"""ldm.evaluation"""
