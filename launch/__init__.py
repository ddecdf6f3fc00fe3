"""Launch scripts: a Cloud TPU VM pod launcher (tpu_pod.py), a SLURM batch script for multi-node
GPU (slurm_gpu.sbatch) and a Colab notebook (colab.ipynb)."""
