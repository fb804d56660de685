"""Train any objective of this repository on one CPU/GPU, or several under torchrun.

    python train.py --objective ntp|mtp|autoencoder|calm|dispersion [--preset cpu|gpu] [--any_config_field VALUE]
    python train.py --objective mtp --help                  every flag of an objective
    torchrun --nproc_per_node 2 train.py ...                data parallel: nccl on GPU, gloo on CPU

The loop is trainer.py; what each objective adds (its model, loss, flags, and what trains first) is objectives.py.
"""
import time

from trainer import main, rank0

RANK0_HEAD_START = 20  # seconds a rank other than 0 waits before it exits on bad input (see below)

if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        # Under torchrun every rank finds the same bad input and exits 2, but only rank 0 prints the line. torchrun
        # stops all ranks as soon as one exits, so a rank that got there first would kill rank 0 before it printed:
        # the other ranks wait, rank 0 exits first, and torchrun then stops them.
        if e.code == 2 and not rank0():
            time.sleep(RANK0_HEAD_START)
        raise
