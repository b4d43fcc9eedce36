"""EfficientAD: one console command, `efficientad`, over the training, export, server and bench stages."""

__version__ = "0.1.0"
