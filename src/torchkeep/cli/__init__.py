"""The ``torchkeep`` command line."""
