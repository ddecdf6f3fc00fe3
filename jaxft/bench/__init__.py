"""Benchmarks, each a program: `python -m jaxft.bench` (train-step throughput, jaxft vs
transformers), `.finetune` (BBC News end to end vs the transformers script), `.peft` (every PEFT
method on BBC News), `.memory` (per-device memory by remat / scan / mesh). Tests never time."""
