"""Every gpu-scale measurement of the repository in one command, for a machine with one CUDA GPU.

    python -m bench gpu [--only core,table,mtp,calm,notebooks] [--notebooks overview,mtp,..] [--out results]
                        [--dry_run]

Steps, in this order (each command in its own process, its output logged to <out>/gpu/<step>.log; a step that
fails is reported at the end and the others still run):
  core       RoPE against learned positions, training tokens/s and MFU, bf16 autocast, --compile off and on, at
             the two CPU shapes of issue 16 and the gpu preset's               -> <out>/gpu/core.json, core_compile.json
  table      python -m bench table --preset gpu: every objective on one FLOPs budget -> <out>/bench_gpu_cuda.json, .csv
  mtp        multi-token prediction on the GPU: training-step memory (head by head vs naive), and the cost of one
             verify forward against one greedy step (when self-speculative decoding pays off)
  calm       CALM's generation speed against next-token prediction, at three backbone widths
  notebooks  python tutorials/run.py --scale gpu: every tutorial (or --notebooks) written back with its outputs
Everything lands in the repository (results/, tutorials/), ready to commit. Expect a few hours on one H100: the
table is sized for ~30 min, each notebook's gpu scale for at most ~30 min; --only and --notebooks split the run.
--toy runs the same commands at toy size on the CPU (tests/test_gpu_paths.py), less the compiled core run and the
MTP memory one, which only add --compile and --device; --dry_run prints the commands.
"""
import os
import subprocess
import sys
import time

import torch

from data import load_data
from runtime import UserError
from runtime import OneLineParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("core", "table", "mtp", "calm", "notebooks")


def plan(out, toy=False, notebooks=()):
    """{step: [argv after `python`, ...]}: the gpu-scale commands, or with toy=True the same flags at toy size on
    the CPU."""
    dev = "cpu" if toy else "cuda"
    core = ["--shapes", "toy", "--rounds", "1", "--steps", "1"] if toy else ["--shapes", "small,medium,gpu"]
    widths = [("1", "2", "32")] if toy else [("4", "4", "128"), ("8", "8", "512"), ("12", "12", "768")]
    runs = [("core", [])] + ([] if toy else [("core_compile", ["--compile"])])
    return {
        "core": [["-m", "bench", "core", "--device", dev, "--bf16", *core, *flag,
                  "--out", os.path.join(out, "gpu", f"{name}.json")] for name, flag in runs],
        "table": [["-m", "bench", "table", "--preset", "tiny" if toy else "gpu", "--device", dev, "--out", out]],
        "mtp": ([] if toy else [["-m", "bench", "mtp", "memory", "--device", dev]]) +
               [["-m", "bench", "mtp", "costs", "--device", dev, "--n", "2", "4",
                 "--widths", *(["32"] if toy else ["256", "512", "1024"])]],
        "calm": [["-m", "bench", "calm", "--device", dev, "--K", "4", "--tokens", "16" if toy else "256",
                  "--n_layer", L, "--n_head", H, "--n_embd", D] for L, H, D in widths],
        "notebooks": [[os.path.join("tutorials", "run.py"), "--scale", "smoke" if toy else "gpu",
                       *(os.path.join("tutorials", f"{n}.ipynb") for n in notebooks)]],
    }


def run_step(name, commands, log_path):
    """Run a step's commands one after the other, output to the terminal and to log_path; the first exit code
    that is not 0, or 0."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        for argv in commands:
            line = "$ python " + " ".join(argv)
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1)
            for text in p.stdout:
                sys.stdout.write(text)
                log.write(text)
            if p.wait() != 0:
                log.write(f"exit code {p.returncode}\n")
                return p.returncode
    return 0


def main(argv=None):
    parser = OneLineParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    parser.add_argument("--notebooks", default="", help="comma-separated notebook names (default: all)")
    parser.add_argument("--out", default="results", help="where results and logs go (logs: <out>/gpu/)")
    parser.add_argument("--toy", action="store_true", help="the same commands at toy size on the CPU (tests)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    a = parser.parse_args(argv)
    steps = [s for s in a.only.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise UserError(f"unknown step {bad[0]!r}: choose from {', '.join(STEPS)}" if bad else "--only names no step")
    notebooks = [n.removesuffix(".ipynb") for n in a.notebooks.split(",") if n]
    missing = [n for n in notebooks if not os.path.exists(os.path.join(ROOT, "tutorials", f"{n}.ipynb"))]
    if missing:
        raise UserError(f"no notebook tutorials/{missing[0]}.ipynb")
    commands = plan(a.out, a.toy, notebooks)
    if a.dry_run:
        for step in steps:
            for c in commands[step]:
                print(f"{step}: python {' '.join(c)}")
        return commands
    if not a.toy and not torch.cuda.is_available():
        raise UserError("python -m bench gpu needs a CUDA GPU and none was found (--dry_run prints the commands)")
    if not a.toy:  # the data every step reads (an offline machine needs the cache): fail now, not in hour two
        for tokenizer in ("bytes", "gpt2"):
            load_data("shakespeare", tokenizer)
    results = {}
    for step in steps:
        t = time.time()
        rc = run_step(step, commands[step], os.path.join(a.out, "gpu", f"{step}.log"))
        results[step] = (rc, (time.time() - t) / 60)
    print("\nstep      | result | minutes | log")
    for step, (rc, minutes) in results.items():
        log = os.path.join(a.out, "gpu", step + ".log")
        print(f"{step:9s} | {'ok' if rc == 0 else f'rc {rc}':6s} | {minutes:7.1f} | {log}")
    if any(rc for rc, _ in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
