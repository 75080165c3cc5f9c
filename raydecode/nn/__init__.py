"""Torch parts more than one method or stage builds on: frozen image encoders and the targets they give a batch
(``encoders``, ``targets``), the diffusion UNet/VAE/scheduler builders (``diffusion``). Nothing here knows a method,
a stage or Ray."""
