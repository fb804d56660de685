"""Train any objective of this repository on one CPU/GPU, or several under torchrun.

    python train.py --objective ntp|mtp|autoencoder|calm|dispersion [--preset cpu|gpu] [--any_config_field VALUE]
    python train.py --objective mtp --help                  every flag of an objective
    torchrun --nproc_per_node 2 train.py ...                data parallel: nccl on GPU, gloo on CPU

The loop is trainer.py; what each objective adds (its model, loss, flags, and what trains first) is objectives.py.
"""
from trainer import main

if __name__ == "__main__":
    main()
