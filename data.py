"""Tokenizers and datasets, tokenized once into memory-mapped caches.

Tokenizers:  'gpt2'  the GPT-2 BPE (tiktoken's r50k_base, 50257 symbols)
             'bytes' UTF-8 bytes (256 symbols; encodes anything, needs no download)
Datasets:    'shakespeare'   Tiny Shakespeare (char-rnn), downloaded once; first 90% train, last 10% val
             'pystdlib'      the running interpreter's standard library source (offline); files in sorted order,
                             every 10th file is validation
             'file:PATH'     any UTF-8 text file; 90% / 10% split
             'A+B'           a cross-domain mix (e.g. 'shakespeare+pystdlib'): each domain's train split cut to the
                             smaller one's length; per-domain splits 'val:A', 'val:B'. Batches of a mix are balanced
                             (row i from domain i mod K, its window inside that domain) and carry their domain labels:
                             x.domains (B,) indexes data.domains (the cross-domain dispersion loss reads them)
             'induction', 'polynomial'   the MTP paper's synthetic tasks, generated in memory with their own
                             tokenizers and an accuracy metric (see the end of this file)
Cache: $LMPAPERS_CACHE (default ~/.cache/lmpapers) holds downloads, token caches and the tiktoken cache
(TIKTOKEN_CACHE_DIR is pointed inside it unless you set it yourself).
"""
import functools
import hashlib
import json
import os
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np
import torch

from runtime import UserError

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
    if name in TASKS:  # a synthetic task's own tokenizer (see the end of this file)
        return TASKS[name][0]
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
    raise UserError(f"unknown dataset {name!r}: choose shakespeare, pystdlib, file:PATH, A+B, induction or polynomial")


def text_file_bytes(path, max_invalid=0.01):
    """The bytes of a file: dataset, refused when it cannot be text (empty, NUL bytes, over 1% invalid UTF-8);
    a few invalid UTF-8 sequences become U+FFFD with a warning that counts them."""
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"dataset file is empty: {path}")
    if b"\0" in raw:
        raise UserError(f"dataset file {path} is binary, not text (it has NUL bytes; UTF-16 text must be converted "
                        f"to UTF-8 first)")
    text = raw.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - raw.count("\ufffd".encode())  # replacement characters that were not there
    if invalid > max_invalid * len(text):
        raise UserError(f"dataset file {path} is not UTF-8 text ({invalid:,} invalid sequences in {len(raw):,} bytes)")
    if invalid:
        print(f"WARNING: dataset file {path} has {invalid:,} invalid UTF-8 sequences: each becomes U+FFFD",
              file=sys.stderr)
    return raw


def dataset_key(name):
    if name.startswith("file:"):
        path = Path(name[5:]).expanduser()
        if not path.is_file():
            raise UserError(f"dataset file not found: {path}")
        digest = hashlib.sha1(text_file_bytes(path)).hexdigest()[:12]  # checked at every load, cached or not
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

    def __init__(self, name, tokenizer, splits, built, domains=None, starts=None):
        self.name, self.tokenizer, self.splits, self.built = name, tokenizer, splits, built
        self.vocab_size = tokenizer.vocab_size
        self.domains = domains or [name]  # a mix 'A+B' has several
        self.starts = starts or {}        # mixed split -> offset where each domain's part begins

    def get_batch(self, split, batch_size, block_size, generator=None, device="cpu"):
        """batch_size random windows: x (B, T) and the next-token targets y (B, T)."""
        ix = self.random_offsets(split, batch_size, block_size, generator)
        return self.batch_at(split, ix, block_size, device)

    def random_offsets(self, split, n, block_size, generator=None):
        data = self.split(split)
        starts = torch.tensor(self.starts.get(split, [0]) + [len(data)])
        room = starts.diff() - block_size - 1  # window starts available inside each domain's part
        if bool((room <= 0).any()):
            raise UserError(f"block_size={block_size} is larger than the {split!r} split of {self.name!r} "
                            f"({int(starts.diff().min())} tokens)")
        if len(room) == 1:
            return torch.randint(int(room[0]), (n,), generator=generator)
        k = torch.arange(n) % len(room)  # balanced: row i from domain i mod K
        return starts[k] + (torch.rand(n, generator=generator, dtype=torch.float64) * room[k]).long()

    def batch_at(self, split, ix, block_size, device="cpu"):
        data = self.split(split)
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
        x, y = x.to(device), y.to(device)
        if len(self.domains) > 1:  # domain label of every row: by offset, or the split's own domain ('val:A')
            own = split.partition(":")[2]
            x.domains = (torch.full((len(ix),), self.domains.index(own)) if own in self.domains else
                         torch.searchsorted(torch.tensor(self.starts[split]), ix, right=True) - 1).to(device)
        return x, y

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
        starts = {"train": [i * n for i in range(len(domains))],
                  "val": np.cumsum([0] + [len(splits[f"val:{d}"]) for d in domains[:-1]]).tolist()}
        return Dataset(name, tokenizer, splits, built, domains, starts)
    return Dataset(name, tokenizer, splits, built)


def load_data(dataset=None, tokenizer=None):
    """What train.py calls. None means 'the default': shakespeare / gpt2, falling back to pystdlib / bytes with a
    warning when the download is impossible. An explicit choice that cannot be downloaded is a one-line error."""
    if dataset in TASKS:
        return load_task(dataset, tokenizer)
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


# ============================================================================= synthetic tasks (MTP paper, sec. 4)
# Two small tasks from Gloeckle et al. (2024) on which multi-token prediction helps small models, as datasets that
# train.py can use like any other (--dataset induction | polynomial). Every episode is BOS + content, padded to a
# fixed length E; a training window is one whole episode (x = ep[:T], y = ep[1:T+1], padding targets = -1, which the
# losses ignore). Each split is generated from its own seed (deterministic, no download), and each episode carries a
# mask of its scored positions, which `TaskDataset.accuracy` uses.
#   induction   random two-token "names" (an upper-case letter then a digit) inside lower-case filler; each name
#               recurs; score: the name's second token at every recurrence (token accuracy; chance 10%)
#   polynomial  expressions in the ring F_7[X]/(X^5) (coefficients mod 7, degree < 5) with m operations among
#               + (add), * (multiply), o (compose p(q(X))), - (negate); the answer's 5 coefficients after '='.
#               train and val: m = 1..5; 'val:ood': m = 6..8 (out of distribution); score: exact match of all 5

TASK_EPISODES = {"train": 20000, "val": 1000, "val:ood": 1000}


class CharTokenizer:
    """One token per character of a fixed alphabet ('\\n' = beginning of episode, '_' = padding)."""

    def __init__(self, name, alphabet):
        self.name, self.alphabet = name, alphabet
        self.stoi = {c: i for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet)
        self.bos, self.pad = self.stoi["\n"], self.stoi["_"]

    def encode(self, text):
        bad = sorted(set(text) - set(self.stoi))
        if bad:
            raise UserError(f"the {self.name} tokenizer has no symbol for {''.join(bad)!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[int(i)] for i in ids)


INDUCTION_TOKENIZER = CharTokenizer("induction", "\n_" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                    + "0123456789")
POLYNOMIAL_TOKENIZER = CharTokenizer("polynomial", "\n_0123456+*o-()=;")


def induction_episode(rng, length=64, n_names=3, max_repeats=3):
    """(text, scored character indices): `length` characters of filler with n_names two-character names, each
    occurring 2..max_repeats+1 times; the scored indices are the second characters of every recurrence."""
    counts = rng.integers(2, max_repeats + 2, size=n_names)
    firsts = rng.choice(26, size=n_names, replace=False)
    seconds = rng.integers(0, 10, size=n_names)
    order = rng.permutation(np.repeat(np.arange(n_names), counts))            # which name at each occurrence
    m = len(order)
    starts = np.sort(rng.choice(length - m, size=m, replace=False)) + np.arange(m)  # non-overlapping pairs
    chars = [chr(ord("a") + c) for c in rng.integers(0, 26, size=length)]
    scored, seen = [], set()
    for name, p in zip(order, starts):
        chars[p], chars[p + 1] = chr(ord("A") + firsts[name]), str(seconds[name])
        if name in seen:
            scored.append(p + 1)
        seen.add(name)
    return "".join(chars), scored


def poly_mul(p, q):
    """Product in F_7[X]/(X^5): schoolbook convolution, dropping degrees >= 5."""
    r = [0] * 5
    for i in range(5):
        for j in range(5 - i):
            r[i + j] = (r[i + j] + p[i] * q[j]) % 7
    return r


def poly_compose(p, q):
    """p(q(X)) in F_7[X]/(X^5), by Horner's rule on the coefficients of p."""
    r = [0] * 5
    for c in reversed(p):
        r = poly_mul(r, q)
        r[0] = (r[0] + c) % 7
    return r


def polynomial_expression(rng, m):
    """(text, value): a random expression with m operations, operands written as 5 coefficients c0..c4."""
    if m == 0:
        p = [int(c) for c in rng.integers(0, 7, size=5)]
        return "".join(map(str, p)), p
    if rng.random() < 0.25:  # unary negation
        text, p = polynomial_expression(rng, m - 1)
        return "-" + text, [(-c) % 7 for c in p]
    k = int(rng.integers(0, m))
    (lt, lp), (rt, rp) = polynomial_expression(rng, k), polynomial_expression(rng, m - 1 - k)
    op = "+*o"[int(rng.integers(0, 3))]
    value = {"+": lambda: [(a + b) % 7 for a, b in zip(lp, rp)], "*": lambda: poly_mul(lp, rp),
             "o": lambda: poly_compose(lp, rp)}[op]()
    return f"({lt}{op}{rt})", value


def polynomial_episode(rng, min_ops=1, max_ops=5):
    """(text, scored character indices): 'expression=c0c1c2c3c4;' with the 5 answer characters scored."""
    expr, value = polynomial_expression(rng, int(rng.integers(min_ops, max_ops + 1)))
    text = f"{expr}={''.join(map(str, value))};"
    return text, list(range(len(expr) + 1, len(expr) + 6))


TASKS = {  # name: (tokenizer, episode length E incl. BOS, split -> episode maker, metric)
    "induction": (INDUCTION_TOKENIZER, 65, {s: induction_episode for s in ("train", "val")}, "token"),
    "polynomial": (POLYNOMIAL_TOKENIZER, 81, {"train": polynomial_episode, "val": polynomial_episode,
                                               "val:ood": lambda rng: polynomial_episode(rng, 6, 8)}, "exact"),
}


@functools.lru_cache(maxsize=None)  # generated once per process
def make_task_split(task, split, n_episodes, seed):
    """(tokens (N, E) uint8, scored (N, E) bool), deterministic given the seed; scored marks answer tokens."""
    tok, E, makers, _ = TASKS[task]
    rng = np.random.default_rng(seed)
    tokens = np.full((n_episodes, E), tok.pad, dtype=np.uint8)
    scored = np.zeros((n_episodes, E), dtype=bool)
    for n in range(n_episodes):
        text, answer = makers[split](rng)
        ids = [tok.bos] + tok.encode(text)
        assert len(ids) <= E, f"{task} episode of {len(ids)} tokens exceeds {E}"
        tokens[n, :len(ids)] = ids
        scored[n, [a + 1 for a in answer]] = True  # +1: the BOS token
    return tokens, scored


class TaskDataset(Dataset):
    """A synthetic task: splits are flat streams of whole episodes (so BrierLM / dispersion windows still work);
    training windows are whole episodes, with padding targets = -1."""

    def __init__(self, task):
        tok, E, makers, self.metric = TASKS[task]
        self.E, self.episodes, self.scored = E, {}, {}
        for i, split in enumerate(makers):
            seed = 1000 * (i + 1) + sum(map(ord, task))  # one fixed seed per (task, split)
            self.episodes[split], self.scored[split] = make_task_split(task, split, TASK_EPISODES[split], seed)
        # T must reach every scored target (y[t] = ep[t + 1]) and stay inside one episode
        self.min_block = max(int(np.nonzero(s.any(0))[0].max()) for s in self.scored.values())
        super().__init__(task, tok, {s: e.reshape(-1) for s, e in self.episodes.items()}, [])

    def check_block(self, block_size):
        if not self.min_block <= block_size <= self.E - 1:
            raise UserError(f"--dataset {self.name} needs {self.min_block} <= --block_size <= {self.E - 1} "
                            f"(its episodes are {self.E} tokens), got {block_size}")

    def random_offsets(self, split, n, block_size, generator=None):
        """Episode indices (not token offsets): every window starts at an episode's BOS."""
        self.check_block(block_size)
        return torch.randint(len(self.split(split)) // self.E, (n,), generator=generator)

    def batch_at(self, split, ix, block_size, device="cpu"):
        self.split(split)  # a clear error for an unknown split
        ep = torch.from_numpy(self.episodes[split][ix.numpy()].astype(np.int64))  # (B, E)
        x, y = ep[:, :block_size], ep[:, 1:block_size + 1].clone()
        y[y == self.tokenizer.pad] = -1  # no loss on padding
        return x.to(device), y.to(device)

    @torch.no_grad()
    def accuracy(self, next_token_logits, split="val", n_episodes=None, batch_size=100, block_size=None,
                 device="cpu"):
        """Teacher-forced accuracy of next_token_logits(x (B, T)) -> (B, T, V) on the scored tokens of a split.
        'exact' tasks count an episode right only when all its scored tokens are the argmax, which is exactly
        greedy decoding after the '=' producing the right answer; 'token' tasks average over scored tokens."""
        T = block_size or self.E - 1
        self.check_block(T)
        episodes, scored = self.episodes[split], self.scored[split]
        n = len(episodes) if n_episodes is None else min(n_episodes, len(episodes))
        hits, total = 0, 0
        for lo in range(0, n, batch_size):
            ix = torch.arange(lo, min(n, lo + batch_size))
            x, y = self.batch_at(split, ix, T, device)
            mask = torch.from_numpy(scored[ix.numpy(), 1:T + 1]).to(device)   # (B, T): scored targets
            right = (next_token_logits(x).argmax(-1) == y) | ~mask              # (B, T)
            if self.metric == "exact":
                hits, total = hits + int(right.all(1).sum()), total + len(ix)
            else:
                hits, total = hits + int((right & mask).sum()), total + int(mask.sum())
        return hits / max(total, 1)


def load_task(name, tokenizer=None):
    tok = TASKS[name][0]
    if tokenizer not in (None, tok.name):
        raise UserError(f"--dataset {name} has its own tokenizer: leave --tokenizer unset (got {tokenizer!r})")
    return TaskDataset(name)
