"""Detectors, embedders and their Beam model handlers.

Everything here but :mod:`models.handlers` runs without apache_beam, so the
models can be benchmarked on a GPU machine that has only torch.
"""
