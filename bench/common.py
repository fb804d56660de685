"""What several benchmarks share: timing on an asynchronous device, and a model as train.py would build it."""
import torch

import objectives
import trainer
from runtime import to_argv


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so a wall-clock reading means something."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def architecture(flags):
    """(model with random weights, args, objective) as train.py would build them, without data or training."""
    args, objective = trainer.parse_args(to_argv(flags))
    args.device = "cpu"
    return objective.build(objectives.gpt_config(args, 256), args), args, objective
