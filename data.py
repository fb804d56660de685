"""Tokenizers and datasets, tokenized once into memory-mapped caches.

Tokenizers:  'gpt2'  the GPT-2 BPE (tiktoken's r50k_base, 50257 symbols)
             'bytes' UTF-8 bytes (256 symbols; encodes anything, needs no download)
Datasets:    'shakespeare'   Tiny Shakespeare (char-rnn), downloaded once; first 90% train, last 10% val
             'pystdlib'      the running interpreter's standard library source (offline); files in sorted order,
                             every 10th file is validation
             'file:PATH'     any UTF-8 text file; 90% / 10% split
             'A+B'           a cross-domain mix (e.g. 'shakespeare+pystdlib'): each domain's train split cut to the
                             smaller one's length, so both are sampled equally; per-domain splits 'val:A', 'val:B'
Cache: $LMPAPERS_CACHE (default ~/.cache/lmpapers) holds downloads, token caches and the tiktoken cache
(TIKTOKEN_CACHE_DIR is pointed inside it unless you set it yourself).
"""
import hashlib
import json
import os
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np
import torch

from gpt import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_DATASET, DEFAULT_TOKENIZER = "shakespeare", "gpt2"
FALLBACK_DATASET, FALLBACK_TOKENIZER = "pystdlib", "bytes"


class DownloadError(Exception):
    pass


def cache_dir():
    return Path(os.environ.get("LMPAPERS_CACHE", Path.home() / ".cache" / "lmpapers"))


# ----------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    name, vocab_size = "bytes", 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self):
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache_dir() / "tiktoken"))
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("r50k_base")  # downloads the BPE ranks once into the cache
        except Exception as e:
            raise DownloadError(f"could not load the GPT-2 BPE (tiktoken r50k_base): {type(e).__name__}") from e
        self.vocab_size = self.enc.n_vocab  # 50257

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_many(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors="replace")


def get_tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer {name!r}: choose 'gpt2' or 'bytes'")


# ----------------------------------------------------------------------------- raw text

def shakespeare_text():
    path = cache_dir() / "shakespeare" / "input.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=15) as r:
                raw = r.read()
        except Exception as e:
            raise DownloadError(f"could not download Tiny Shakespeare: {type(e).__name__}") from e
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.replace(path)
    return path.read_text(encoding="utf-8")


def pystdlib_files():
    """(relative path, source) of the stdlib's .py files, sorted; tests, site-packages and demos left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "__pycache__", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                files.append((str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")))
    return sorted(files)


def split_texts(name):
    """{'train': [texts], 'val': [texts]} for one single-domain dataset name."""
    if name == "shakespeare":
        text = shakespeare_text()
        n = int(0.9 * len(text))
        return {"train": [text[:n]], "val": [text[n:]]}
    if name == "pystdlib":
        files = pystdlib_files()
        return {"train": [s for i, (_, s) in enumerate(files) if i % 10 != 9],
                "val": [s for i, (_, s) in enumerate(files) if i % 10 == 9]}
    if name.startswith("file:"):
        path = Path(name[5:]).expanduser()
        if not path.is_file():
            raise UserError(f"dataset file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
        n = int(0.9 * len(text))
        return {"train": [text[:n]], "val": [text[n:]]}
    raise UserError(f"unknown dataset {name!r}: choose shakespeare, pystdlib, file:PATH or A+B")


def dataset_key(name):
    if name.startswith("file:"):
        path = Path(name[5:]).expanduser()
        if not path.is_file():
            raise UserError(f"dataset file not found: {path}")
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
        return f"file-{path.stem}-{digest}"
    if name == "pystdlib":
        return f"pystdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    return name


# ----------------------------------------------------------------------------- token caches

def tokenize_to_cache(texts, tokenizer, path):
    ids = tokenizer.encode_many(texts) if hasattr(tokenizer, "encode_many") else [tokenizer.encode(t) for t in texts]
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    arr = np.fromiter((i for seq in ids for i in seq), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    arr.tofile(tmp)
    tmp.replace(path)  # atomic: a half-written cache is never read


class Dataset:
    """Token splits of one dataset as read-only memmaps; `built` lists the splits tokenized by this load."""

    def __init__(self, name, tokenizer, splits, built):
        self.name, self.tokenizer, self.splits, self.built = name, tokenizer, splits, built
        self.vocab_size = tokenizer.vocab_size

    def get_batch(self, split, batch_size, block_size, generator=None, device="cpu"):
        """batch_size random windows: x (B, T) and the next-token targets y (B, T)."""
        ix = self.random_offsets(split, batch_size, block_size, generator)
        return self.batch_at(split, ix, block_size, device)

    def random_offsets(self, split, n, block_size, generator=None):
        data = self.split(split)
        if len(data) <= block_size + 1:
            raise UserError(f"block_size={block_size} is larger than the {split!r} split of {self.name!r} "
                            f"({len(data)} tokens)")
        return torch.randint(len(data) - block_size - 1, (n,), generator=generator)

    def batch_at(self, split, ix, block_size, device="cpu"):
        data = self.split(split)
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
        return x.to(device), y.to(device)

    def split(self, split):
        if split not in self.splits:
            raise UserError(f"dataset {self.name!r} has no split {split!r} (has {', '.join(self.splits)})")
        return self.splits[split]


def load_dataset(name, tokenizer_name):
    """Tokenize `name` with `tokenizer_name` once (cached on disk), then return it as memmaps."""
    tokenizer = get_tokenizer(tokenizer_name)
    domains = name.split("+")
    splits, built = {}, []
    for domain in domains:
        key = dataset_key(domain)
        paths = {s: cache_dir() / "tokens" / f"{key}.{tokenizer_name}.{s}.bin" for s in ("train", "val")}
        if not all(p.exists() for p in paths.values()):
            texts = split_texts(domain)
            for s, p in paths.items():
                tokenize_to_cache(texts[s], tokenizer, p)
                built.append(f"{domain}:{s}")
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        for s, p in paths.items():
            splits[f"{s}:{domain}"] = np.memmap(p, dtype=dtype, mode="r")
    if len(domains) == 1:
        splits = {"train": splits[f"train:{name}"], "val": splits[f"val:{name}"]}
    else:  # equal share of every domain in train; val keeps everything, per domain and together
        n = min(len(splits[f"train:{d}"]) for d in domains)
        splits["train"] = np.concatenate([splits[f"train:{d}"][:n] for d in domains])
        splits["val"] = np.concatenate([splits[f"val:{d}"] for d in domains])
    return Dataset(name, tokenizer, splits, built)


def load_data(dataset=None, tokenizer=None):
    """What train.py calls. None means 'the default': shakespeare / gpt2, falling back to pystdlib / bytes with a
    warning when the download is impossible. An explicit choice that cannot be downloaded is a one-line error."""
    ds, tok = dataset or DEFAULT_DATASET, tokenizer or DEFAULT_TOKENIZER
    try:
        get_tokenizer(tok)
    except DownloadError as e:
        if tokenizer is not None:
            raise UserError(f"{e}; offline, use --tokenizer bytes or put the tiktoken cache in "
                            f"{os.environ.get('TIKTOKEN_CACHE_DIR')}") from None
        print(f"WARNING: {e}; falling back to --tokenizer {FALLBACK_TOKENIZER}", file=sys.stderr)
        tok = FALLBACK_TOKENIZER
    try:
        return load_dataset(ds, tok)
    except DownloadError as e:
        if dataset is not None:
            raise UserError(f"{e}; offline, use --dataset pystdlib or --dataset file:PATH, or put the text at "
                            f"{cache_dir() / 'shakespeare' / 'input.txt'}") from None
        print(f"WARNING: {e}; falling back to --dataset {FALLBACK_DATASET}", file=sys.stderr)
        return load_dataset(FALLBACK_DATASET, tok)
