"""The demo: the seed model of the PyTorch tutorial, checkpointed with torchkeep."""
