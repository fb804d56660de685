"""Benchmarks: the numbers of the README and the tutorials (nothing here is asserted by a test's clock).

    python -m bench table [--preset tiny|cpu|gpu]      every objective on one table, same data, backbone and FLOPs
    python -m bench mtp memory|speculative|costs       multi-token prediction: memory, accepted tokens, verify cost
    python -m bench calm [--K 4]                       CALM's generation speed against next-token prediction
    python -m bench core [--shapes small,medium]       the core GPT's training speed, RoPE against learned positions
    python -m bench gpu [--only ...] [--dry_run]       every gpu-scale measurement and notebook, one CUDA GPU
    python -m bench dispersion sweep|arithmetic|layers_knn   the dispersion tutorial's runs (results/dispersion_*.json)
    python -m bench calm run|list [EXPERIMENT]         CALM's recipe sweep, curves and head comparison (calm_runs.py)
    python -m bench brierlm [--scale cpu]              the BrierLM tutorial's study (results/brierlm_<scale>.json)
    python -m bench verify results/<file>.json RUN-ID  re-run one recorded run at the current code and compare

bench/flops.py holds the one training-FLOPs formula every comparison uses: bench.train_flops_per_token.
"""
from bench.flops import ae_flops_per_token, train_flops_per_token  # noqa: F401  (bench.train_flops_per_token)
