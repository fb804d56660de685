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
(TIKTOKEN_CACHE_DIR is pointed inside it unless you set it yourself). A token cache is named by the content of its
source text (shakespeare, file:PATH), so a changed or replaced text is tokenized again, never read stale.
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

def shakespeare_file():
    """The path of Tiny Shakespeare in the cache, downloaded once."""
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
    return path


def source_file(name):
    """The text file behind the dataset 'shakespeare' or 'file:PATH'."""
    if name == "shakespeare":
        return shakespeare_file()
    path = Path(name[5:]).expanduser()
    if path.is_dir():
        raise UserError(f"dataset {name!r}: {path} is a directory; give a text file")
    if not path.exists():
        raise UserError(f"dataset file not found: {path}")
    if not path.is_file():
        raise UserError(f"dataset {name!r}: {path} is not a regular file (a device or a pipe); give a text file")
    return path


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
    if name == "pystdlib":
        files = pystdlib_files()
        return {"train": [s for i, (_, s) in enumerate(files) if i % 10 != 9],
                "val": [s for i, (_, s) in enumerate(files) if i % 10 == 9]}
    if name == "shakespeare" or name.startswith("file:"):
        text = source_file(name).read_text(encoding="utf-8", errors="replace")
        n = int(0.9 * len(text))
        return {"train": [text[:n]], "val": [text[n:]]}
    if name in TASKS:
        raise UserError(f"the synthetic task {name!r} cannot be part of a mix (it has its own tokenizer and "
                        f"episodes): use --dataset {name} alone")
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
    """The token cache's name for one dataset: a text file's is its content's digest, so a changed file (or a
    bad cached input.txt replaced by the real one) is tokenized again."""
    if name == "shakespeare" or name.startswith("file:"):
        path = source_file(name)
        try:
            digest = hashlib.sha1(text_file_bytes(path)).hexdigest()[:12]  # checked at every load, cached or not
        except UserError as e:
            raise UserError(f"{e}; delete it and it is downloaded again" if name == "shakespeare" else str(e)) \
                from None
        return f"shakespeare-{digest}" if name == "shakespeare" else f"file-{path.stem}-{digest}"
    if name == "pystdlib":
        return f"pystdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    return name


# ----------------------------------------------------------------------------- token caches

def tokenize_to_cache(texts, tokenizer, path):
    ids = tokenizer.encode_many(texts) if hasattr(tokenizer, "encode_many") else [tokenizer.encode(t) for t in texts]
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    arr = np.fromiter((i for seq in ids for i in seq), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: torchrun's ranks may build it together
    arr.tofile(tmp)
    tmp.replace(path)  # atomic: a half-written cache is never read


def read_cache(path, dtype):
    """A token cache as a read-only memmap (an empty split as an empty array: mmap refuses empty files)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)


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
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    splits, built = {}, []
    for domain in domains:
        key = dataset_key(domain)
        paths = {s: cache_dir() / "tokens" / f"{key}.{tokenizer_name}.{s}.bin" for s in ("train", "val")}
        # a missing cache, or one cut short (not whole tokens), is built again
        if not all(p.is_file() and p.stat().st_size % np.dtype(dtype).itemsize == 0 for p in paths.values()):
            texts = split_texts(domain)
            for s, p in paths.items():
                tokenize_to_cache(texts[s], tokenizer, p)
                built.append(f"{domain}:{s}")
        for s, p in paths.items():
            splits[f"{s}:{domain}"] = read_cache(p, dtype)
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
    if tok in TASKS:
        raise UserError(f"--tokenizer {tok} is the tokenizer of --dataset {tok} only: for --dataset {ds} choose "
                        f"gpt2 or bytes")
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
# train.py can use like any other: --dataset induction | polynomial, or configured, e.g.
#     --dataset induction:names=6,length=64          --dataset polynomial:ops=+*o-,m=1-5,ood=6-8
# (options and defaults: TASK_OPTIONS). Every episode is BOS + content, padded to a fixed length E; a training window
# is one whole episode (x = ep[:T], y = ep[1:T+1]). Targets the loss ignores are -1: padding always, and with
# loss=answer every target that is not a scored token (an MTP head i is then trained exactly where its target
# x_t+i+1 is a scored token: mtp.head_loss ignores -1). Training batches are FRESH episodes, generated from seeds
# that the batch generator draws (so a run is deterministic and resumes exactly); the val splits are fixed sets
# generated from one seed per (task, split); 'train' also keeps a small fixed pool, for code that reads a split as
# a token stream (BrierLM, dispersion). `TaskDataset.accuracy` scores the scored tokens; `no_skill` gives the
# baselines a model without the skill reaches.
#   induction   `names` names, each a string of `name_len` symbols (letters and digits; every symbol of every name
#               distinct, so a name's first symbol identifies it), in random filler of the other symbols. Each name
#               occurs once in the first half of the episode and recurs once in the second half, in another order.
#               Score: every symbol of a recurrence after its first, token accuracy (the paper scores the second
#               token of two-token names: name_len=2; at our scale names of 12 symbols form induction within
#               minutes, names of 2 to 4 symbols did not within 4,000 iterations). The default loss is on the scored
#               symbols only (loss=all, a language model's loss, is mostly on unpredictable random symbols: a 4 x 64
#               model had not formed induction after 3,000 iterations with it). Without induction a model can at
#               best guess among the symbols it has seen in the episode: induction_guess_baseline (about 1/27);
#               chance is 1/62.
#   polynomial  expressions in F_7[X]/(X^5) (coefficients mod 7, degree < 5) with m operations drawn uniformly from
#               `ops` among + (add), * (multiply), o (compose p(q(X))), - (negate); the answer is the 5
#               coefficients after '='. train and val: m in the range `m`; 'val:ood': m in `ood` (more operations
#               than training). Score: exact match of all 5 answer digits. Default loss on the answer digits only.
#               The default mix is what a small model learns on a CPU: + * - with one operation (two out of
#               distribution); with 1-2 operations in training a 4 x 64 model stays near 0.02 exact match after 3,000
#               iterations, and with the paper's 1-5 (+ * o -) near 0.

TASK_EPISODES = {"train": 1000, "val": 1000, "val:ood": 1000}  # fixed splits ('train': a pool, see above)
TASK_OPTIONS = {  # task: {option: default}; a configured name lists the options it changes
    "induction": dict(names=1, name_len=12, length=48, loss="answer"),
    "polynomial": dict(ops="+*-", m="1", ood="2", loss="answer"),
}
POLY_OPS = "+*o-"
INDUCTION_SYMBOLS = 62  # a-z, A-Z, 0-9: names and filler


class TaskNames(dict):
    """TASKS: name -> task; `in` also accepts a configured name 'task:option=value,...' (load_data asks `in`)."""

    def __contains__(self, name):
        return isinstance(name, str) and super().__contains__(name.partition(":")[0])


def parse_range(text, option):
    lo, _, hi = str(text).partition("-")
    if not (lo.isdigit() and (hi.isdigit() or not hi)):
        raise UserError(f"polynomial option {option}={text!r}: give a number of operations or a range like 1-2")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi <= 12:
        raise UserError(f"polynomial option {option}={text!r}: need 1 <= low <= high <= 12 operations")
    return lo, hi


def parse_task(name):
    """(task, options) of 'task' or 'task:option=value,...', every option checked: bad input is one UserError."""
    task, _, rest = name.partition(":")
    if task not in TASK_OPTIONS:
        raise UserError(f"unknown task {task!r}: choose from {', '.join(TASK_OPTIONS)}")
    opts = dict(TASK_OPTIONS[task])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in opts or not eq:
            raise UserError(f"--dataset {name}: {item!r} is not an option of {task} (options: "
                            f"{', '.join(f'{k}={v}' for k, v in TASK_OPTIONS[task].items())})")
        opts[key] = value
    if opts["loss"] not in ("all", "answer"):
        raise UserError(f"--dataset {name}: loss must be 'all' or 'answer', got {opts['loss']!r}")
    if task == "induction":
        for key in ("names", "name_len", "length"):
            if not str(opts[key]).isdigit():
                raise UserError(f"--dataset {name}: {key} must be a whole number, got {opts[key]!r}")
            opts[key] = int(opts[key])
        if opts["names"] < 1 or opts["name_len"] < 2:
            raise UserError(f"--dataset {name}: the induction task needs at least 1 name of at least 2 symbols (the "
                            f"first is the cue, the rest are scored), got names={opts['names']}, "
                            f"name_len={opts['name_len']}")
        if opts["names"] * opts["name_len"] > INDUCTION_SYMBOLS - 2:
            raise UserError(f"--dataset {name}: {opts['names']} names of {opts['name_len']} distinct symbols need "
                            f"{opts['names'] * opts['name_len']} distinct symbols (and filler), the alphabet has "
                            f"{INDUCTION_SYMBOLS}: fewer distinct names than the configuration needs")
        if opts["length"] // 2 < 2 * opts["names"] * opts["name_len"]:
            raise UserError(f"--dataset {name}: {opts['names']} names of {opts['name_len']} symbols need length >= "
                            f"{4 * opts['names'] * opts['name_len']} (each half holds every name and as much "
                            f"filler), got length={opts['length']}")
    else:
        ops = opts["ops"]
        if not ops or set(ops) - set(POLY_OPS) or len(set(ops)) != len(ops):
            raise UserError(f"--dataset {name}: ops must be a non-empty set of distinct operations among "
                            f"{' '.join(POLY_OPS)}, got ops={ops!r}")
        opts["m"], opts["ood"] = parse_range(opts["m"], "m"), parse_range(opts["ood"], "ood")
        if opts["ood"][0] <= opts["m"][1]:
            raise UserError(f"--dataset {name}: the out-of-distribution split must have more operations than "
                            f"training (m up to {opts['m'][1]}), got ood={opts['ood'][0]}-{opts['ood'][1]}")
    return task, opts


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


ALPHABET = "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789"  # induction's symbols
INDUCTION_TOKENIZER = CharTokenizer("induction", "\n_" + ALPHABET)
POLYNOMIAL_TOKENIZER = CharTokenizer("polynomial", "\n_0123456+*o-()=;")


def place_slots(rng, start, room, k, width):
    """Start positions of k non-overlapping slots of `width` characters inside [start, start + room), in order."""
    return start + np.sort(rng.choice(room - k * (width - 1), size=k, replace=False)) + (width - 1) * np.arange(k)


def induction_episode(rng, names=1, name_len=12, length=48):
    """(text, scored character indices): `length` random symbols (of a-z A-Z 0-9) in which `names` names of
    `name_len` symbols (all distinct, and absent from the filler) occur once in the first half and recur once in
    the second half, in random order and at random places; scored: every symbol of a recurrence after its first."""
    symbols = rng.permutation(INDUCTION_SYMBOLS)
    words = [[ALPHABET[c] for c in symbols[i * name_len:(i + 1) * name_len]] for i in range(names)]
    rest = symbols[names * name_len:]
    chars = [ALPHABET[c] for c in rest[rng.integers(0, len(rest), size=length)]]
    half, scored = length // 2, []
    for k, (lo, hi) in enumerate(((0, half), (half, length))):
        for p, who in zip(place_slots(rng, lo, hi - lo, names, name_len), rng.permutation(names)):
            chars[p:p + name_len] = words[who]
            if k:
                scored += range(p + 1, p + name_len)
    return "".join(chars), sorted(scored)


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


def polynomial_expression(rng, m, ops=POLY_OPS):
    """(text, value): a random expression with m operations, each drawn uniformly from ops; operands are written
    as their 5 coefficients c0..c4; a binary operation splits the remaining m - 1 operations at random."""
    if m == 0:
        p = [int(c) for c in rng.integers(0, 7, size=5)]
        return "".join(map(str, p)), p
    op = ops[int(rng.integers(0, len(ops)))]
    if op == "-":  # unary negation
        text, p = polynomial_expression(rng, m - 1, ops)
        return "-" + text, [(-c) % 7 for c in p]
    k = int(rng.integers(0, m))
    (lt, lp), (rt, rp) = polynomial_expression(rng, k, ops), polynomial_expression(rng, m - 1 - k, ops)
    value = {"+": lambda: [(a + b) % 7 for a, b in zip(lp, rp)], "*": lambda: poly_mul(lp, rp),
             "o": lambda: poly_compose(lp, rp)}[op]()
    return f"({lt}{op}{rt})", value


def polynomial_episode(rng, ops=POLY_OPS, m=(1, 1)):
    """(text, scored character indices): 'expression=c0c1c2c3c4;' with the 5 answer characters scored."""
    expr, value = polynomial_expression(rng, int(rng.integers(m[0], m[1] + 1)), ops)
    text = f"{expr}={''.join(map(str, value))};"
    return text, list(range(len(expr) + 1, len(expr) + 6))


def task_spec(name):
    """(tokenizer, episode length E incl. BOS, {split: episode maker (rng) -> (text, scored)}, metric) of a task."""
    task, o = parse_task(name)
    if task == "induction":
        make = functools.partial(induction_episode, names=o["names"], name_len=o["name_len"], length=o["length"])
        return INDUCTION_TOKENIZER, o["length"] + 1, {"train": make, "val": make}, "token"
    makers = {"train": functools.partial(polynomial_episode, ops=o["ops"], m=o["m"]),
              "val:ood": functools.partial(polynomial_episode, ops=o["ops"], m=o["ood"])}
    makers["val"] = makers["train"]
    return POLYNOMIAL_TOKENIZER, 8 * o["ood"][1] + 13, makers, "exact"  # longest: (8m + 5) + '=' 5 digits ';' + BOS


TASKS = TaskNames(induction=(INDUCTION_TOKENIZER, TASK_OPTIONS["induction"]),  # task: (tokenizer, defaults);
                  polynomial=(POLYNOMIAL_TOKENIZER, TASK_OPTIONS["polynomial"]))  # load_data asks `in`


def encode_episodes(tok, E, episodes):
    """[(text, scored character indices)] -> (tokens (N, E) uint8, scored (N, E) bool): BOS + text, padded."""
    tokens = np.full((len(episodes), E), tok.pad, dtype=np.uint8)
    scored = np.zeros((len(episodes), E), dtype=bool)
    for n, (text, answer) in enumerate(episodes):
        ids = [tok.bos] + tok.encode(text)
        assert len(ids) <= E, f"an episode of {len(ids)} tokens exceeds {E}"
        tokens[n, :len(ids)] = ids
        scored[n, [a + 1 for a in answer]] = True  # +1: the BOS token
    return tokens, scored


@functools.lru_cache(maxsize=None)  # generated once per process
def make_task_split(task, split, n_episodes, seed):
    """(tokens (N, E) uint8, scored (N, E) bool) of a (configured) task's split, deterministic given the seed."""
    tok, E, makers, _ = task_spec(task)
    rng = np.random.default_rng(seed)
    return encode_episodes(tok, E, [makers[split](rng) for _ in range(n_episodes)])


def induction_guess_baseline(tokens, scored):
    """The accuracy of a model with no induction that guesses uniformly among the symbols already seen in the
    episode (every scored symbol was seen in the name's first occurrence): the mean over scored positions of
    1 / (distinct symbols before it, BOS and padding left out). tokens, scored: (N, E) as make_task_split gives."""
    total, count = 0.0, 0
    for ep, sc in zip(np.asarray(tokens), np.asarray(scored)):
        seen = set()
        for t in range(1, len(ep)):
            if sc[t]:
                total, count = total + 1 / max(len(seen), 1), count + 1
            seen.add(int(ep[t]))
    return total / max(count, 1)


class TaskDataset(Dataset):
    """A synthetic task: splits are flat streams of whole episodes (so BrierLM / dispersion windows still work);
    training windows are whole episodes, fresh ones every batch, with the ignored targets = -1."""

    def __init__(self, name):
        tok, E, makers, self.metric = task_spec(name)
        self.task, self.options = parse_task(name)
        self.E, self.makers, self.episodes, self.scored = E, makers, {}, {}
        for i, split in enumerate(makers):
            seed = 1000 * (i + 1) + sum(map(ord, self.task))  # one fixed seed per (task, split)
            self.episodes[split], self.scored[split] = make_task_split(name, split, TASK_EPISODES[split], seed)
        # T must reach every scored target (y[t] = ep[t + 1]) and stay inside one episode
        self.min_block = max(int(np.nonzero(s.any(0))[0].max()) for s in self.scored.values())
        super().__init__(name, tok, {s: e.reshape(-1) for s, e in self.episodes.items()}, [])

    def check_block(self, block_size):
        if not self.min_block <= block_size <= self.E - 1:
            raise UserError(f"--dataset {self.name} needs {self.min_block} <= --block_size <= {self.E - 1} "
                            f"(its episodes are {self.E} tokens), got {block_size}")

    def random_offsets(self, split, n, block_size, generator=None):
        """Episode indices of a fixed split; for 'train', seeds of fresh episodes. Every window starts at a BOS."""
        self.check_block(block_size)
        if split == "train":
            return torch.randint(2 ** 62, (n,), generator=generator)
        return torch.randint(len(self.split(split)) // self.E, (n,), generator=generator)

    def fresh(self, seeds):
        """(tokens, scored) of fresh training episodes, one per seed (the same seed gives the same episode)."""
        return encode_episodes(self.tokenizer, self.E,
                               [self.makers["train"](np.random.default_rng(int(s))) for s in seeds])

    def windows(self, tokens, scored, block_size, device="cpu"):
        """x = ep[:T], y = ep[1:T+1] of whole episodes, y = -1 where the loss ignores it (padding; with
        loss=answer, every target that is not a scored token)."""
        ep = torch.from_numpy(np.asarray(tokens).astype(np.int64))
        x, y = ep[:, :block_size], ep[:, 1:block_size + 1].clone()
        ignore = y == self.tokenizer.pad
        if self.options["loss"] == "answer":
            ignore |= ~torch.from_numpy(np.asarray(scored)[:, 1:block_size + 1])
        y[ignore] = -1
        return x.to(device), y.to(device)

    def batch_at(self, split, ix, block_size, device="cpu"):
        self.split(split)  # a clear error for an unknown split
        if split == "train":
            tokens, scored = self.fresh(ix.tolist())
        else:
            tokens, scored = self.episodes[split][ix.numpy()], self.scored[split][ix.numpy()]
        return self.windows(tokens, scored, block_size, device)

    def no_skill(self, split="val"):
        """What a model without the skill scores on a split, {name: accuracy in the task's metric}: 'chance'
        (uniform over the answer's symbols: 62 / 7); induction: 'guess_seen' (uniform among the symbols already
        seen in the episode, induction_guess_baseline); polynomial: 'common_digit' (the most common
        digit of the training distribution at each answer position, estimated on 5,000 fresh episodes; exact
        match and, as 'common_digit_per_digit', per digit) and 'chance_per_digit'."""
        tokens, scored = self.episodes[split], self.scored[split]
        if self.task == "induction":
            return dict(chance=1 / INDUCTION_SYMBOLS, guess_seen=induction_guess_baseline(tokens, scored))
        digits = lambda t, s: np.stack([row[mask] for row, mask in zip(t, s)])  # noqa: E731  (N, 5) answer tokens
        train = digits(*self.fresh(np.random.default_rng(7).integers(0, 2 ** 62, size=5000)))
        common = np.array([np.bincount(col, minlength=self.vocab_size).argmax() for col in train.T])
        right = digits(tokens, scored) == common
        return dict(chance=7.0 ** -5, chance_per_digit=1 / 7, common_digit=float(right.all(1).mean()),
                    common_digit_per_digit=float(right.mean()))

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
            ep = torch.from_numpy(episodes[ix.numpy(), :T + 1].astype(np.int64)).to(device)
            x, y = ep[:, :T], ep[:, 1:]                                         # every true target
            mask = torch.from_numpy(scored[ix.numpy(), 1:T + 1]).to(device)   # (B, T): scored targets
            right = (next_token_logits(x).argmax(-1) == y) | ~mask              # (B, T)
            if self.metric == "exact":
                hits, total = hits + int(right.all(1).sum()), total + len(ix)
            else:
                hits, total = hits + int((right & mask).sum()), total + int(mask.sum())
        return hits / max(total, 1)


def load_task(name, tokenizer=None):
    tok = task_spec(name)[0]
    if tokenizer not in (None, tok.name):
        raise UserError(f"--dataset {name} has its own tokenizer: leave --tokenizer unset (got {tokenizer!r})")
    return TaskDataset(name)
