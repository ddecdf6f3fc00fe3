"""Run machinery: train state and steps, optimizer, checkpoints, run directories, opening a
trained run, evaluation, logs and FLOP counts."""
