"""The single Ray Train + DeepSpeed loop, checkpointing and launch (TorchTrainer)."""
