"""Optimizers and the factory that assigns parameter groups to them."""
