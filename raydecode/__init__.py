"""raydecode: distributed cross-subject fMRI-to-image decoding on the Natural Scenes Dataset."""

__version__ = "0.1.0"
