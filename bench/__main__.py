"""python -m bench <table|core|mtp|calm|dispersion|brierlm|gpu|verify> [flags]: one entry point for every benchmark (see bench/__init__.py)."""
import importlib
import sys

from runtime import UserError

COMMANDS = {"table": "bench.table", "core": "bench.core", "mtp": "bench.mtp_bench", "calm": "bench.calm_bench",
            "dispersion": "bench.dispersion_experiments", "gpu": "bench.gpu", "verify": "bench.records",
            "brierlm": "bench.brierlm_experiments"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(importlib.import_module("bench").__doc__)
        return
    try:
        if not argv or argv[0] not in COMMANDS:
            raise UserError(f"choose a benchmark: python -m bench {{{'|'.join(COMMANDS)}}} [flags] "
                            f"(got {' '.join(argv[:1]) or 'nothing'})")
        sys.argv[0] = f"python -m bench {argv[0]}"
        if argv[:2] == ["mtp", "sweep"]:  # the scale findings live apart from the micro-benchmarks
            return importlib.import_module("bench.mtp_experiments").main(argv[2:])
        if argv[:1] == ["calm"] and argv[1:2] in (["run"], ["list"]):  # CALM's experiments: bench/calm_runs.py
            return importlib.import_module("bench.calm_runs").main(argv[1:])
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
