"""Run machinery for finetune_ssm.py: results files, checkpoints, logging, optimisation, evaluation."""
