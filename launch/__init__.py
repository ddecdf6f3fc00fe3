"""Launchers: N local processes of one run (local.py: python -m launch.local), a Cloud TPU VM
pod launcher (tpu_pod.py), a SLURM batch script for multi-node GPU (slurm_gpu.sbatch) and a
Colab notebook (colab.ipynb). Run from the checkout."""
