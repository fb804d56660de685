"""Key figures of the tutorials, drawn from committed results, by the notebook and by tutorials/figures.py alike.

The convention (one file per notebook):

  tutorials/keyfigs/<notebook>.py      for tutorials/<notebook>.ipynb, e.g. keyfigs/brierlm.py
      RESULTS = ["results/<name>_gpu.json", "results/<name>_cpu.json"]
                                        paths from the repository root; figures.py draws from the first that exists
      or RESULTS = {"<part>": [paths...], ...}
                                        several files (e.g. one per sweep script): `results` is then the dict
                                        {part: the first of its paths that exists, loaded}; all parts are needed
      NEEDS = {"<figure name>": ["<part>", ...], ...}
                                        optional, with a dict RESULTS: each figure needs only these parts (the
                                        others it draws when present); `results` then holds the parts that exist,
                                        and a figure whose parts are missing is skipped on its own
      USES = {"<figure name>": ["<part>", ...], ...}
                                        optional, with NEEDS: parts a figure also draws when they exist
      FIGURES = {"<figure name>": function, ...}
                                        each function(results: dict) -> matplotlib Figure; its docstring's first
                                        paragraph is the caption (what the figure shows); no plt.show(), no I/O
  the notebook                          computes `results` (or reads the committed JSON at cpu/gpu scale), writes
                                        results/<name>_<scale>.json at cpu/gpu scale, and shows each key figure with
                                        `figs.<function>(results)`: the same code draws the notebook and the slides
  python tutorials/figures.py          writes every FIGURES entry of every module as PNG and SVG into one folder;
                                        a notebook with no module, or a module whose results file is absent, is
                                        skipped with one line; a function that raises is reported and the rest go on

Nothing here imports torch or the repository: a figure module needs only matplotlib, numpy and its JSON.
"""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def first_existing(candidates, root=ROOT):
    """The first of candidates (a path or a list of paths from the repository root) that exists, absolute; or None."""
    for path in [candidates] if isinstance(candidates, str) else list(candidates):
        full = os.path.join(root, path)
        if os.path.exists(full):
            return full
    return None


def results_path(module, root=ROOT):
    """The first of module.RESULTS that exists, as an absolute path; or None. When RESULTS is a dict of parts:
    {part: absolute path}, or None if any part has no file (with NEEDS: the parts that have one; None if none)."""
    if not isinstance(module.RESULTS, dict):
        return first_existing(module.RESULTS, root)
    paths = {part: first_existing(candidates, root) for part, candidates in module.RESULTS.items()}
    if hasattr(module, "NEEDS"):
        return {part: path for part, path in paths.items() if path} or None
    return None if None in paths.values() else paths


def missing(module, figure, path):
    """The files of the parts that `figure` needs and `path` (what results_path found) lacks: [] when it can be
    drawn. Only a module with NEEDS can lack a part here (without NEEDS, results_path wants every part)."""
    if not hasattr(module, "NEEDS"):
        return []
    groups = [module.RESULTS[part] for part in module.NEEDS.get(figure, module.RESULTS) if part not in path]
    return [p for g in groups for p in ([g] if isinstance(g, str) else g)]


def used(module, figure, path):
    """The files `figure` is drawn from: its NEEDS and USES parts that exist (everything in path without NEEDS)."""
    if not hasattr(module, "NEEDS"):
        return path
    parts = list(module.NEEDS.get(figure, module.RESULTS)) + list(getattr(module, "USES", {}).get(figure, []))
    return {part: path[part] for part in parts if part in path}


def wanted(module, root=ROOT):
    """The paths named by module.RESULTS, as a flat list (for a dict of parts: those of the parts with no file)."""
    groups = [g for g in module.RESULTS.values() if first_existing(g, root) is None] \
        if isinstance(module.RESULTS, dict) else [module.RESULTS]
    return [p for g in groups for p in ([g] if isinstance(g, str) else g)]


def load(path):
    """The JSON at path; for a dict {part: path}, the dict {part: its JSON}."""
    if isinstance(path, dict):
        return {part: load(p) for part, p in path.items()}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def caption(fn):
    """The first paragraph of a figure function's docstring, on one line."""
    return " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())


def provenance_line(data, current_code=None):
    """One line to print under a stored figure: what made the runs of a results file (bench/records.py's format):
    the experiment, commits, seeds, threads, hardware; and which runs are stale (made by code other than
    current_code, the hash bench.records.code_hash gives now), legacy (recorded before provenance) or unverified."""
    runs = data.get("runs", {}) if isinstance(data, dict) else {}
    provs = [r.get("provenance", {}) for r in runs.values()] or [data.get("provenance", {})]
    commits = sorted({p.get("commit", "?")[:7] for p in provs})
    seeds = sorted({p.get("seed") for p in provs if p.get("seed") is not None})
    threads = sorted({p.get("threads") for p in provs if p.get("threads") is not None})
    hardware = sorted({p.get("hardware", "?") for p in provs})
    row_checks = [v for row in data.get("rows", []) if isinstance(row, dict) for v in row.get("verified", [])]
    records = runs or {"the run": dict(data, verified=data.get("verified", []) + row_checks)}  # a table: its rows'
    legacy = [n for n, r in records.items() if r.get("provenance", {}).get("legacy")]
    verified = [n for n, r in records.items() if any(v.get("agree") for v in r.get("verified", []))]
    # As records.current_codes, but stricter for the reader: an exact re-check at today's code vouches for the runs
    # of the same code *and objective* (a CALM run also depends on its autoencoder, which an NTP run never trains).
    # A re-check on another CPU (or after a change that moved the last bits) agrees only within the noise: said so.
    kind = {n: (r.get("provenance", {}).get("code"), r.get("config", {}).get("objective")) for n, r in records.items()}
    checks = [(kind[n], v) for n, r in records.items() for v in r.get("verified", []) if v.get("code") == current_code]
    current = {k for k, v in checks if v.get("agree") and v.get("exact")}
    close = {k for k, v in checks if v.get("agree") or v.get("within_noise")} - current
    failed = {n for n, r in records.items() if any(v.get("code") == current_code and not v.get("agree")
                                                    and not v.get("within_noise") for v in r.get("verified", []))}
    other = [n for n, r in records.items() if r.get("stale") or (current_code and kind[n][0] not in (current_code, None))]
    vouched = [n for n in other if not records[n].get("stale") and n not in failed]  # a run whose own check failed: no
    rechecked = [n for n in vouched if kind[n] in current]
    noisy = [n for n in vouched if kind[n] in close]
    prefix = [v.get("points") for k, v in checks if v.get("points") and (v.get("agree") or v.get("within_noise"))]
    stale = [n for n in other if n not in rechecked and n not in noisy]
    parts = [f"{data.get('experiment', 'results')}: {len(runs) or 1} run(s)",
             f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}",
             f"seeds {', '.join(map(str, seeds))}" if seeds else None,
             f"{'/'.join(map(str, threads))} thread(s)" if threads else None, "; ".join(hardware)]
    if legacy:
        parts.append(f"{len(legacy)} recorded before provenance (code unknown; {len(verified)} re-checked with "
                     f"bench verify and agreeing)")
    if rechecked:
        parts.append(f"{len(rechecked)} made by earlier code whose re-check at today's code (bench verify) came back "
                     f"bit for bit")
    if noisy:
        parts.append(f"{len(noisy)} made by earlier code or on another CPU whose re-check at today's code (bench verify) "
                     f"agrees within the noise, not bit for bit")
    if prefix and (rechecked or noisy):
        parts.append(f"re-checks of long runs on a prefix of their points ({', '.join(sorted(set(prefix)))})")
    if stale:
        parts.append(f"STALE: {len(stale)} made by other code than today's ({', '.join(stale[:3])}"
                     f"{' ...' if len(stale) > 3 else ''})")
    return "provenance: " + " | ".join(p for p in parts if p)
