"""The HTTP inference server (python -m jaxft.serve)."""
