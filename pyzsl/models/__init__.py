"""Models: :mod:`pyzsl.models.lesa` (shared multi-attention) and :mod:`pyzsl.models.tfvaegan` (TF-VAEGAN, f-CLSWGAN)."""
