"""Training: the engine, the DeepSpeed configuration and the A³Tune trainer that runs on them."""
