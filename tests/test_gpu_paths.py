"""The gpu-scale code paths, run on the CPU at toy size so that a GPU run does not die on a typo: bf16 autocast
through every objective, the gpu presets' flags, --compile, python -m bench gpu's commands, and the notebook runner
(tutorials/run.py) without Jupyter."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import objectives
import runtime
import train
import trainer
from bench import core, gpu, table
from util import one_line_error

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "2"]


@pytest.mark.parametrize("objective, extra", [("ntp", []), ("mtp", ["--n_future", "2"]), ("dispersion", []),
                                              ("autoencoder", ["--chunk_size", "2"]), ("calm", ["--chunk_size", "2"])])
def test_bf16_autocast_trains_every_objective(objective, extra):
    """What train.py does on CUDA (torch.autocast bf16), with the gpu preset's flags, on the CPU's autocast."""
    args, obj = trainer.parse_args(["--objective", objective, "--preset", "gpu", "--device", "cpu", *TOY, *extra])
    assert args.dropout == 0.2 and args.learning_rate == 6e-4  # the gpu preset's, not the defaults
    torch.manual_seed(0)
    model = obj.build(objectives.gpt_config(args, 256), args).train()
    x, y = torch.randint(256, (2, 16)), torch.randint(256, (2, 16))
    loss, _ = trainer.forward_backward(model, obj, x, y, args, 1.0, torch.autocast("cpu", dtype=torch.bfloat16))
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if objective not in ("autoencoder",):  # what the eval and sampling of a bf16 run call
            out = obj.generate(model.eval(), torch.zeros(1, 4, dtype=torch.long),
                                  argparse_like(args, max_new_tokens=4), torch.Generator().manual_seed(0))
            assert out.shape[1] >= 4


def argparse_like(args, **changes):
    new = type(args)(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def test_gpu_preset_flags_train_end_to_end(tmp_path):
    """train.py --preset gpu at toy size: the preset's flags through training, evaluation, BrierLM and a sample."""
    argv = ["--preset", "gpu", "--device", "cpu", "--dataset", "shakespeare", "--tokenizer", "bytes", *TOY,
            "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1",
            "--brier_positions", "4", "--sample_tokens", "4", "--out_dir", str(tmp_path)]
    metrics = trainer.run_quietly(argv)
    assert metrics["iter"] == 2 and math.isfinite(metrics["val_loss"])
    saved = runtime.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert saved["args"]["dropout"] == 0.2 and saved["args"]["warmup_iters"] == 200 and saved["args"]["n_layer"] == 2


def test_compiled_blocks_train_like_eager():
    """--compile (train.py and bench/core.py compile every Block): one training step of a compiled one-block GPT
    gives the eager step's loss and gradients. Compiled with the aot_eager backend: TorchDynamo's capture and
    AOTAutograd (RoPE's compiled form is its real-arithmetic branch) in seconds; inductor's code generation is the
    GPU's own (Triton) and takes a minute to build on a CPU."""
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)
    eager, compiled = core.build(shape, "rope"), core.build(shape, "rope")
    for block in compiled.blocks:
        block.compile(backend="aot_eager")
    x, y = torch.randint(256, (2, 16)), torch.randint(256, (2, 16))
    losses = [model(x, y)[1] for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_table_gpu_preset_has_every_key_and_its_core_throughput_runs():
    gpu_preset, cpu_preset = table.PRESETS["gpu"], table.PRESETS["cpu"]
    assert gpu_preset.keys() == cpu_preset.keys() and gpu_preset["model"].keys() == cpu_preset["model"].keys()
    toy = {**gpu_preset, "model": core.SHAPES["toy"][0], "batch_size": 2, "timing_steps": 2}
    r = table.core_throughput(toy, "cpu", False, steps=1, rounds=1)
    assert r["tok_s"] > 0 and r["tok_s_learned"] > 0 and r["rope_vs_learned"] > 0 and r["mfu"] == "n/a on CPU"


def test_core_benchmark_under_bf16_autocast_and_its_bad_input(capsys):
    r = core.compare(*core.SHAPES["toy"], rounds=2, steps=1, autocast_dtype=torch.bfloat16, clock="cpu")
    assert set(r["tok_s"]) == {"rope", "learned"} and r["precision"] == "bf16 autocast" and r["clock"] == "cpu"
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and len(r["rounds"]["rope"]) == 2
    from bench.__main__ import main
    assert "unknown shape 'huge'" in one_line_error(capsys, main, ["core", "--shapes", "huge"])
    assert "invalid choice: 'sundial'" in one_line_error(capsys, main, ["core", "--clock", "sundial"])
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in one_line_error(capsys, main, ["core", "--device", "cuda"])


def test_bench_gpu_runs_its_commands_at_toy_size(tmp_path, capsys):
    """python -m bench gpu --toy: the gpu run's core, mtp and calm commands, same flags, toy sizes, on the CPU (the
    table's own tests run its tiny preset; the runner's are below)."""
    gpu.main(["--toy", "--only", "core,mtp,calm", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "core      | ok" in out and "mtp       | ok" in out and "calm      | ok" in out
    results = json.loads((tmp_path / "gpu" / "core.json").read_text())["results"]
    assert results[0]["precision"] == "bf16 autocast" and results[0]["tok_s"]["rope"] > 0
    assert "speed-up" in (tmp_path / "gpu" / "calm.log").read_text()
    assert "speculative decoding pays when tokens/forward > ratio" in (tmp_path / "gpu" / "mtp.log").read_text()


def test_bench_gpu_plan_and_refusals(capsys):
    from bench.__main__ import main
    plan = main(["gpu", "--dry_run"])
    assert set(plan) == set(gpu.STEPS)
    assert ["-m", "bench", "table", "--preset", "gpu", "--device", "cuda", "--out", "results"] in plan["table"]
    assert plan["notebooks"] == [["tutorials/run.py", "--scale", "gpu"]]  # every notebook
    assert plan["core"][1][-3:] == ["--compile", "--out", "results/gpu/core_compile.json"]
    assert main(["gpu", "--dry_run", "--notebooks", "mtp"])["notebooks"][0][-1] == "tutorials/mtp.ipynb"
    assert "unknown step 'tabel'" in one_line_error(capsys, main, ["gpu", "--only", "tabel"])
    assert "no notebook" in one_line_error(capsys, main, ["gpu", "--notebooks", "nope", "--dry_run"])
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in one_line_error(capsys, main, ["gpu"])


# ----------------------------------------------------------------------------- the notebook runner

def code(source):
    return {"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": None}


def write_notebook(path, cells):
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                "display_name": "Python 3"}}, "nbformat": 4, "nbformat_minor": 4}))


def run_notebooks(*argv):
    return subprocess.run([sys.executable, str(ROOT / "tutorials" / "run.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("executor", ["builtin", "nbclient"])
def test_runner_writes_outputs_and_stops_at_an_error(executor, tmp_path):
    if executor == "nbclient":
        pytest.importorskip("nbclient")
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    (tmp_path / "helper.py").write_text("VALUE = 21\n")  # the notebook's folder is its working directory
    write_notebook(good, [
        {"cell_type": "markdown", "metadata": {}, "source": "# a tiny notebook"},
        code("import os, sys\nimport matplotlib.pyplot as plt\nfrom helper import VALUE\n"
             "print('scale', os.environ['TUTORIAL_SCALE'])\nprint('a warning', file=sys.stderr)"),
        code("plt.plot([1, 2, 3])\nplt.show()\nprint('after the figure')\nVALUE * 2"),
        code("plt.figure(); plt.plot([3, 1])\nVALUE + 1;")])
    write_notebook(bad, [code("x = 1\nprint('ran')"), code("raise ValueError('boom\\nsecond line')"),
                         code("print('never runs')")])
    before = bad.read_text()
    # nbclient: written in place; built-in: into --out, given relative to the working directory (the repository)
    out = [] if executor == "nbclient" else ["--out", os.path.relpath(tmp_path / "written", ROOT)]
    r = run_notebooks("--scale", "smoke", "--executor", executor, "--failed_dir", str(tmp_path / "failed"), *out,
                      str(good), str(bad))
    assert r.returncode == 1
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == \
        [f"error: bad.ipynb cell 2: ValueError: boom (partial notebook: {tmp_path / 'failed' / 'bad.failed.ipynb'})"]
    assert bad.read_text() == before  # a failing notebook is not written over
    written = good if executor == "nbclient" else tmp_path / "written" / "good.ipynb"
    cells = [c for c in json.loads(written.read_text())["cells"] if c["cell_type"] == "code"]
    outs = [[(o["output_type"], o.get("name")) for o in c["outputs"]] for c in cells]
    assert outs[0] == [("stream", "stdout"), ("stream", "stderr")]
    assert "".join(cells[0]["outputs"][0]["text"]) == "scale smoke\n"
    assert outs[1] == [("display_data", None), ("stream", "stdout"), ("execute_result", None)]
    assert cells[1]["outputs"][1]["text"] == ["after the figure\n"]
    assert "".join(cells[1]["outputs"][2]["data"]["text/plain"]) == "42"
    assert cells[1]["outputs"][0]["data"]["image/png"].startswith("iVBOR")  # a PNG
    assert outs[2] == [("display_data", None)]  # an open figure is shown; the ; hides the value
    assert [c["execution_count"] for c in cells] == [1, 2, 3]
    failed = json.loads((tmp_path / "failed" / "bad.failed.ipynb").read_text())["cells"]
    assert [o["output_type"] for o in failed[1]["outputs"]] == ["error"] and failed[2]["outputs"] == []
    assert failed[1]["outputs"][0]["ename"] == "ValueError"


def test_runner_bad_input_is_one_line():
    r = run_notebooks("--scale", "smoke", "no_such.ipynb")
    assert r.returncode == 2 and r.stderr.startswith("error: no notebook at") and r.stderr.count("\n") == 1
    if not torch.cuda.is_available():
        r = run_notebooks("--scale", "gpu")
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr
