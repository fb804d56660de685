"""Tokenizers, token caches, batches and the offline fallback."""
import numpy as np
import pytest
import torch

import data
from runtime import UserError

TEXT = "ROMEO: But soft! What light through yonder window breaks?\n\tdef f(x): return x ** 2  # héllo 😀\n"


def test_byte_tokenizer_round_trips_anything():
    tok = data.get_tokenizer("bytes")
    assert tok.vocab_size == 256
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.decode(ids) == TEXT


def test_gpt2_tokenizer_is_gpt2_bpe_and_round_trips():
    tok = data.get_tokenizer("gpt2")
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids for this string
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_token_cache_is_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPAPERS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 200)
    first = data.load_dataset(f"file:{path}", "bytes")
    assert first.built == [f"file:{path}:train", f"file:{path}:val"]
    bins = sorted((tmp_path / "cache" / "tokens").glob("*.bin"))
    mtimes = [b.stat().st_mtime_ns for b in bins]
    second = data.load_dataset(f"file:{path}", "bytes")
    assert second.built == []
    assert [b.stat().st_mtime_ns for b in bins] == mtimes
    raw = np.frombuffer((TEXT * 200).encode(), dtype=np.uint8)
    n = len(first.split("train"))
    assert np.array_equal(np.asarray(second.split("train")), raw[:n])
    # a changed file gets a new cache
    path.write_text(TEXT * 300)
    assert data.load_dataset(f"file:{path}", "bytes").built != []


def test_batches_are_next_token_windows():
    ds = data.load_dataset("shakespeare", "bytes")
    gen = torch.Generator().manual_seed(0)
    x, y = ds.get_batch("train", 4, 32, gen)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = ds.tokenizer.decode(x[0].tolist())
    assert text in open(data.cache_dir() / "shakespeare" / "input.txt", encoding="utf-8").read()


def test_pystdlib_split_is_deterministic_and_by_file():
    files = data.pystdlib_files()
    assert files == sorted(files) and len(files) > 100
    texts = data.split_texts("pystdlib")
    assert len(texts["val"]) == len(files) // 10 and texts["val"][0] == files[9][1]


def test_cross_domain_mix_balances_train_and_keeps_per_domain_val():
    ds = data.load_dataset("shakespeare+pystdlib", "bytes")
    n = len(ds.split("train:shakespeare"))
    assert len(ds.split("train")) == 2 * n
    assert len(ds.split("val")) == len(ds.split("val:shakespeare")) + len(ds.split("val:pystdlib"))


def test_block_size_larger_than_data_and_unknown_names_are_user_errors(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("tiny text " * 10)
    ds = data.load_dataset(f"file:{path}", "bytes")
    with pytest.raises(UserError, match="block_size=64 is larger"):
        ds.get_batch("val", 2, 64)
    with pytest.raises(UserError, match="unknown dataset"):
        data.load_dataset("wikipedia", "bytes")
    with pytest.raises(UserError, match="unknown tokenizer"):
        data.get_tokenizer("sentencepiece")
    with pytest.raises(UserError, match="not found"):
        data.load_dataset(f"file:{tmp_path}/missing.txt", "bytes")


def offline(monkeypatch, tmp_path):
    """No network: the Shakespeare download and the tiktoken download both fail, nothing is cached."""
    monkeypatch.setenv("LMPAPERS_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # connection refused

    def no_bpe(self):
        raise data.DownloadError("could not load the GPT-2 BPE (tiktoken r50k_base): ConnectionError")
    monkeypatch.setattr(data.GPT2Tokenizer, "__init__", no_bpe)


def test_defaults_fall_back_offline_with_a_warning(monkeypatch, tmp_path, capsys):
    offline(monkeypatch, tmp_path)
    ds = data.load_data()
    assert (ds.name, ds.tokenizer.name) == ("pystdlib", "bytes")
    err = capsys.readouterr().err
    assert "WARNING" in err and "--tokenizer bytes" in err and "--dataset pystdlib" in err


def test_explicit_choices_fail_offline_with_advice(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="offline, use --dataset pystdlib"):
        data.load_data("shakespeare", "bytes")
    with pytest.raises(UserError, match="offline, use --tokenizer bytes"):
        data.load_data("pystdlib", "gpt2")
