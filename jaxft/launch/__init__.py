"""Launchers that start the processes of a multi-process run (see jaxft/distributed.py)."""
