"""Devices and meshes: logical-axis sharding, multi-process start-up, AOT compilation for TPU
topologies."""
