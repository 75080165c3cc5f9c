"""What a method's model is before it trains: parameter counts per part (``info``) and the memory it needs per GPU
under DeepSpeed ZeRO (``memory``), for ``raydecode model-info``."""
