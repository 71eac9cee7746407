"""Datasets and the feature store.

- :mod:`pyzsl.data.store`: the HDF5 feature store (``features``, ``labels``, ``label_names``, ``image_ids``).
- :mod:`pyzsl.data.multilabel`: multi-label ZSL datasets (synthetic, NUS-WIDE, Open Images) for LESA.
- :mod:`pyzsl.data.xlsa17`: generalized ZSL datasets in the xlsa17 format (CUB, AWA2, SUN, FLO) and synthetic-gzsl.
- :mod:`pyzsl.data.images`: image loading (DALI, or PIL/torchvision) for feature extraction.
"""
