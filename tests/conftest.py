"""Test setup: a data cache inside the repo (.cache/), seeded from ../shared/data when it exists (offline CI),
and the repo root on sys.path so tests import gpt, data, train ... directly."""
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMPAPERS_CACHE", str(ROOT / ".cache"))
CACHE = Path(os.environ["LMPAPERS_CACHE"])
SHARED = ROOT.parent / "shared" / "data"
if SHARED.is_dir():
    (CACHE / "tiktoken").mkdir(parents=True, exist_ok=True)
    for f in (SHARED / "tiktoken").glob("*"):
        if not (CACHE / "tiktoken" / f.name).exists():
            shutil.copy(f, CACHE / "tiktoken" / f.name)
    if (SHARED / "tinyshakespeare.txt").exists() and not (CACHE / "shakespeare" / "input.txt").exists():
        (CACHE / "shakespeare").mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "tinyshakespeare.txt", CACHE / "shakespeare" / "input.txt")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(CACHE / "tiktoken"))
