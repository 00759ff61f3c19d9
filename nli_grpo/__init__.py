"""GRPO chain-of-thought training and evaluation for natural language inference on Slurm."""

__version__ = "0.1.0"
