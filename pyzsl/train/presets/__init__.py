"""Per-dataset training presets (published settings, with their sources) for the pyzsl trainers."""
