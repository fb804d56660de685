"""Every result says what made it, a sweep reuses only what today's code and settings would make again, and
`python -m bench verify` re-checks a run (bench/records.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainer
from bench import calm_runs, records
from util import one_line_error

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("commit", "dirty", "code", "config", "torch", "threads", "device", "hardware", "wall_seconds")


def run_records(data):
    """The run records of a results file: its runs, a table's rows, or the file itself (one measurement)."""
    if isinstance(data.get("runs"), dict) and data["runs"]:
        return data["runs"]
    if isinstance(data.get("rows"), list) and data["rows"] and isinstance(data["rows"][0], dict):
        return {str(i): r for i, r in enumerate(data["rows"])}
    return {"the file": data}


def commit_exists(commit):
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True).returncode == 0


def test_every_result_records_what_made_it():
    files = sorted((ROOT / "results").glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        for name, rec in run_records(data).items():
            prov = rec.get("provenance")
            assert prov is not None, f"{path.name}: {name} has no provenance"
            missing = [f for f in FIELDS if f not in prov]
            assert not missing, f"{path.name}: {name} lacks {missing}"
            assert commit_exists(prov["commit"]), f"{path.name}: {name}: commit {prov['commit']} is not in the history"
            assert prov["code"] is not None or prov.get("legacy"), f"{path.name}: {name}: no code hash, not legacy"


def test_the_code_hash_follows_the_imported_source(tmp_path, monkeypatch):
    assert "calm" in records.imported_modules(["bench.calm_runs"])  # transitively, through objectives
    assert "score" not in records.imported_modules(["bench.calm_runs"])
    before = records.code_hash(["bench.calm_runs"])
    assert before == records.code_hash(["bench.calm_runs"]) and before != records.code_hash(["bench.table"])
    fake = tmp_path / "calm.py"  # the same module name with other content: another hash
    fake.write_text((ROOT / "calm.py").read_text() + "\n# changed\n")
    real = records.module_file
    monkeypatch.setattr(records, "module_file", lambda name: str(fake) if name == "calm" else real(name))
    assert records.code_hash(["bench.calm_runs"]) != before


def smoke_run(tmp_path, reuse_stale=False):
    calm_runs.run("smoke_curves", only=r"calm K=4 seed 0", log=lambda *a: None, results=str(tmp_path / "r"),
                  work=str(tmp_path / "w"), reuse_stale=reuse_stale)
    return json.loads((tmp_path / "r" / "calm_smoke_curves.json").read_text())


def test_a_sweep_reuses_only_runs_of_the_same_code(tmp_path, monkeypatch):
    first = smoke_run(tmp_path)["runs"]["calm K=4 seed 0"]
    assert first["provenance"]["code"] == records.code_hash(["bench.calm_runs"])
    calls = []
    real = trainer.run_quietly
    monkeypatch.setattr(trainer, "run_quietly", lambda flags: calls.append(flags) or real(flags))
    again = smoke_run(tmp_path)["runs"]["calm K=4 seed 0"]
    assert calls == [] and again == first  # the same code and settings: reused, nothing trained
    path = tmp_path / "r" / "calm_smoke_curves.json"
    data = json.loads(path.read_text())  # a record made by other code
    data["runs"]["calm K=4 seed 0"]["provenance"]["code"] = "sha256:other"
    path.write_text(json.dumps(data))
    records.write_json(str(tmp_path / "w" / "smoke_curves" / "calm_K=4_seed_0" / "provenance.json"),
                       dict(config=first["config"], code="sha256:other"))  # and its checkpoint too
    kept = smoke_run(tmp_path, reuse_stale=True)["runs"]["calm K=4 seed 0"]
    assert calls == [] and kept["stale"] is True  # reuse_stale keeps it, marked
    fresh = smoke_run(tmp_path)["runs"]["calm K=4 seed 0"]
    assert calls and all("--overwrite" in f for f in calls[:1])  # trained afresh, not resumed from the checkpoint
    assert fresh["provenance"]["code"] == records.code_hash(["bench.calm_runs"]) and "stale" not in fresh
    assert [p["brier1"] for p in fresh["points"]] == [p["brier1"] for p in first["points"]]  # seeded: the same
    assert fresh["post"] == first["post"]  # the post-training measurements made again, not dropped with the old record


def test_verify_agrees_on_a_deterministic_run_and_catches_a_changed_number(tmp_path):
    smoke_run(tmp_path)
    path = tmp_path / "r" / "calm_smoke_curves.json"
    lines = []
    assert records.verify(str(path), "calm K=4 seed 0", log=lines.append)
    assert "exact" in lines[0] and lines[-1] == "agree"
    data = json.loads(path.read_text())
    data["runs"]["calm K=4 seed 0"]["points"][-1]["brier1"] += 5  # beyond any noise
    path.write_text(json.dumps(data))
    lines.clear()
    assert not records.verify(str(path), "calm K=4 seed 0", record=True, log=lines.append)
    assert lines[-1] == "differ" and any("DIFFER" in line for line in lines)
    outcome = json.loads(path.read_text())["runs"]["calm K=4 seed 0"]["verified"][-1]
    assert outcome["agree"] is False and commit_exists(outcome["commit"])


def test_verify_is_exact_only_on_the_same_cpu_and_within_the_noise_elsewhere(tmp_path):
    """A run made on another CPU model is compared within its noise (other kernels, other last bits): a small
    difference agrees, and the outcome records exact=False, the hardware and within_noise."""
    import torch
    # one marketing name ("AMD EPYC") covers CPUs whose kernels differ: the vector instructions torch uses are part
    # of the model, so a record without them is never called exact
    assert f"{torch.backends.cpu.get_cpu_capability()}]" in records.cpu_model(records.hardware())
    smoke_run(tmp_path)
    path = tmp_path / "r" / "calm_smoke_curves.json"
    data = json.loads(path.read_text())
    run = data["runs"]["calm K=4 seed 0"]
    run["provenance"]["hardware"] = "x86_64 Some Other CPU, 2 cores, 8 GiB; no GPU used"
    run["points"][-1]["brier1"] += 0.5 * run["points"][-1]["brier1_se"]  # inside 3 standard errors
    path.write_text(json.dumps(data))
    lines = []
    assert records.verify(str(path), "calm K=4 seed 0", record=True, log=lines.append)
    assert "Some Other CPU" in lines[0] and "within the noise" in lines[0] and lines[-1] == "agree"
    outcome = json.loads(path.read_text())["runs"]["calm K=4 seed 0"]["verified"][-1]
    assert outcome["exact"] is False and outcome["within_noise"] is True and outcome["hardware"] == records.hardware()
    data = json.loads(path.read_text())
    data["runs"]["calm K=4 seed 0"]["provenance"]["hardware"] = records.hardware()  # the same CPU: bit for bit
    path.write_text(json.dumps(data))
    lines.clear()
    assert not records.verify(str(path), "calm K=4 seed 0", log=lines.append)
    assert "exact" in lines[0] and lines[-1] == "differ (but within the noise)"


def test_verify_bad_input_is_one_line(tmp_path, capsys):
    import bench.__main__ as cli
    no_prov = tmp_path / "old.json"
    no_prov.write_text(json.dumps({"runs": {"a": {"points": []}}}))
    smoke = tmp_path / "s.json"
    smoke.write_text(json.dumps({"experiment": "calm_smoke_curves", "module": "bench.calm_runs",
                                 "runs": {"a": {"points": []}}}))
    for argv, words in ((["verify", str(tmp_path / "missing.json"), "x"], "no results file"),
                        (["verify", str(no_prov), "a"], "predates provenance"),
                        (["verify", str(smoke), "b"], "has no run 'b'"),
                        (["verify", str(smoke), "a"], "has no provenance")):
        assert words in one_line_error(capsys, cli.main, argv)


def test_an_exact_recheck_at_todays_code_certifies_the_runs_of_the_same_code(tmp_path):
    """Runs of code A; today's code is B. Only an exact, agreeing `bench verify --record` at B of a run of A makes A's
    runs current (reused by a sweep, not STALE under a figure); a run of a third code C stays stale."""
    sys.path.insert(0, str(ROOT / "tutorials"))
    import keyfigs

    def rec(code, verified=()):
        return dict(config={"x": 1}, metrics={}, provenance=dict(code=code, commit="abc"), verified=list(verified))

    def check(verified, certified, noisy=False):
        data = dict(experiment="e", runs={"a1": rec("A", verified), "a2": rec("A"), "c1": rec("C")})
        assert records.current_codes(data, "B") == ({"A", "B"} if certified else {"B"})
        path = tmp_path / "e.json"
        records.write_json(str(path), data)
        results = records.Results(str(path), "e", "m")
        assert (results.reusable("a2", {"x": 1}, "B") is not None) == certified
        assert results.reusable("c1", {"x": 1}, "B") is None
        line = keyfigs.provenance_line(data, "B")
        stale = line.split("STALE: ")[1]
        assert stale.startswith("1 made" if certified or noisy else "3 made") and ("a2" in stale) == (not certified
                                                                                                     and not noisy)
        assert ("re-check at today's code (bench verify) came back bit for bit" in line) == certified
        assert ("agrees within the noise" in line) == noisy  # shown as such, but never reused by a sweep

    check([dict(code="B", agree=True, exact=True)], True)
    check([dict(code="B", agree=False, exact=True)], False)   # it differed
    check([dict(code="B", agree=True, exact=False)], False, noisy=True)  # within the noise only (another CPU)
    check([dict(code="D", agree=True, exact=True)], False)    # re-checked at some other code
    data = dict(experiment="e", runs={"a1": rec("A", [dict(code="B", agree=True, exact=False, within_noise=True)]),
                                      "a2": rec("A"), "c1": rec("C")})
    line = keyfigs.provenance_line(data, "B")  # re-checked on another CPU: within the noise, said so
    assert "2 made by earlier code or on another CPU whose re-check" in line and "STALE: 1 made" in line
    data["runs"]["a2"]["verified"] = [dict(code="B", agree=False, exact=False, within_noise=False)]
    line = keyfigs.provenance_line(data, "B")  # a run whose own re-check failed is never vouched for by another's
    assert "1 made by earlier code or on another CPU whose re-check" in line and "STALE: 2 made" in line
    data = dict(experiment="e", runs={"ntp": dict(rec("A", [dict(code="B", agree=True, exact=True)]), config={"objective": "ntp"}),
                                      "calm": dict(rec("A"), config={"objective": "calm"})})
    line = keyfigs.provenance_line(data, "B")  # under a figure, a re-check vouches only for its own objective
    assert "STALE: 1 made" in line and "(calm)" in line and "1 made by earlier code whose re-check" in line
    data["runs"]["calm"]["verified"] = [dict(code="B", agree=True, exact=False, within_noise=True,
                                             points="first 2 of 7")]
    line = keyfigs.provenance_line(data, "B")  # a long run re-checked on its first points only: said so
    assert "STALE" not in line and "prefix of their points (first 2 of 7)" in line


def test_a_single_record_file_of_other_code_is_stale_under_its_figure():
    """A results file that is one record (the BrierLM study, the bench table) is flagged like a file of runs."""
    sys.path.insert(0, str(ROOT / "tutorials"))
    import keyfigs
    study = dict(experiment="brierlm_cpu", provenance=dict(code="A", commit="abc"), verified=[])
    assert "STALE: 1 made" in keyfigs.provenance_line(study, "B")
    assert "STALE" not in keyfigs.provenance_line(study, "A")
    study["verified"] = [dict(code="B", agree=True, exact=True)]
    line = keyfigs.provenance_line(study, "B")
    assert "STALE" not in line and "re-check at today's code" in line


def test_the_shared_autoencoder_is_reused_only_when_the_same_code_and_settings_made_it(tmp_path, monkeypatch):
    """calm_runs.autoencoder trains the shared autoencoder once and reuses it; one whose provenance names other code
    (or none: cut while training) is trained again, never reused."""
    calls, real = [], trainer.run_quietly
    monkeypatch.setattr(trainer, "run_quietly", lambda flags: calls.append(flags) or real(flags))
    path = calm_runs.autoencoder(4, str(tmp_path), ae_iters=4)
    assert len(calls) == 1 and os.path.isfile(path)
    assert calm_runs.autoencoder(4, str(tmp_path), ae_iters=4) == path and len(calls) == 1  # reused
    marker = os.path.join(os.path.dirname(path), "provenance.json")
    made = json.loads(open(marker).read())
    records.write_json(marker, dict(made, code="sha256:other"))
    calm_runs.autoencoder(4, str(tmp_path), ae_iters=4)
    assert len(calls) == 2 and "--overwrite" in calls[-1]  # other code: trained again
    os.remove(marker)
    calm_runs.autoencoder(4, str(tmp_path), ae_iters=4)
    assert len(calls) == 3 and json.loads(open(marker).read()) == made  # no provenance: trained again


def test_the_code_hash_is_the_source_the_process_loaded_not_the_file_edited_since(tmp_path, monkeypatch):
    """A sweep runs for hours: an edit on disk meanwhile must not change the code its records claim, and the
    record names the module that changed under it."""
    fake = tmp_path / "calm.py"
    fake.write_text((ROOT / "calm.py").read_text())
    real = records.module_file
    monkeypatch.setattr(records, "module_file", lambda name: str(fake) if name == "calm" else real(name))
    prov = records.provenance({"seed": 0}, ["bench.calm_runs"])  # the process loads calm here
    fake.write_text((ROOT / "calm.py").read_text() + "\n# edited while the run trained\n")
    assert records.code_hash(["bench.calm_runs"]) == prov["code"]
    done = records.finish(prov)
    assert done["changed_on_disk"] == ["calm"] and done["code"] == prov["code"]
    assert "calm" not in records.imported_modules(["runtime"])
    assert "changed_on_disk" not in records.finish(records.provenance({"seed": 0}, ["runtime"]))


def test_no_tolerance_is_zero_wide_at_a_bound_or_undefined():
    """An estimate at its bound has a standard error of 0 and an undefined one is NaN: one count of the sample
    apart must still agree within the noise, and two equal numbers always agree."""
    from bench import mtp_experiments
    poly = {"config": {"sweep": "polynomial"},
            "metrics": {"acc_val_ood": 0.0, "n_scored_val_ood": 1000, "acc_val": 1.0, "n_scored_val": 1000}}
    for key, (old, noise) in mtp_experiments.compared(poly).items():
        assert records.agrees(old, abs(old - 0.001), noise), key  # one item in 1,000 flipped
        assert not records.agrees(old, abs(old - 0.05), noise), key  # fifty are not noise
    size = {"config": {"sweep": "size"}, "metrics": dict(val_loss_h1=3.5, val_loss_h1_se=0.01, brier1=0.06,
                                                          brier1_se=0.002, brierlm=0.0, brierlm_se=float("nan"))}
    old, noise = mtp_experiments.compared(size)["brierlm"]
    assert noise == noise and noise > 0 and records.agrees(old, 0.0, noise) and records.agrees(old, 0.1, noise)
    assert not records.agrees(old, 5.0, noise)
    assert records.agrees(0.0, 0.0, float("nan")) and not records.agrees(0.0, 1e-9, float("nan"))
    head = {"config": {"positions": 2048}, "points": [dict(iter=10, **{f"brier{n}": -1.0 for n in range(1, 5)},
                                                           **{f"brier{n}_se": 0.0 for n in range(1, 5)})]}
    old, noise = calm_runs.compared(head)["brier3@10"]
    assert records.agrees(old, -1 + 2 / 2048, noise) and not records.agrees(old, -0.95, noise)


def test_verify_points_rechecks_a_prefix_of_a_long_run(tmp_path, capsys):
    """--points N re-trains only to the N-th scored point (same schedule) and compares those points: a number
    changed at a later point is not looked at, one changed at the first point is caught."""
    import bench.__main__ as cli
    runs = smoke_run(tmp_path)["runs"]
    assert len(runs["calm K=4 seed 0"]["points"]) > 1
    path = tmp_path / "r" / "calm_smoke_curves.json"
    data = json.loads(path.read_text())
    data["runs"]["calm K=4 seed 0"]["points"][-1]["brier1"] += 5
    path.write_text(json.dumps(data))
    lines = []
    assert records.verify(str(path), "calm K=4 seed 0", record=True, log=lines.append, points=1)
    assert "first 1 of" in lines[0] and lines[-1] == "agree" and not any("@" + str(
        data["runs"]["calm K=4 seed 0"]["points"][-1]["iter"]) in line for line in lines[1:-1])
    outcome = json.loads(path.read_text())["runs"]["calm K=4 seed 0"]["verified"][-1]
    assert outcome["agree"] and outcome["exact"] and outcome["points"].startswith("first 1 of")
    data["runs"]["calm K=4 seed 0"]["points"][0]["brier1"] += 5
    path.write_text(json.dumps(data))
    assert not records.verify(str(path), "calm K=4 seed 0", log=lambda *a: None, points=1)
    n = len(data["runs"]["calm K=4 seed 0"]["points"])
    capsys.readouterr()  # the re-runs' warnings
    assert "between 1 and" in one_line_error(capsys, cli.main, ["verify", str(path), "calm K=4 seed 0",
                                                               "--points", str(n + 1)])
    assert "not to bench.mtp_experiments" in one_line_error(
        capsys, cli.main, ["verify", str(ROOT / "results" / "mtp_size.json"), "6x24_n4_s0", "--points", "1"])
