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


# ----------------------------------------------------------------------------- synthetic tasks (MTP)

def brute_force_guess_baseline(texts, scored):
    """For every scored character, 1 over the number of distinct characters before it in its text; the mean."""
    scores = [1 / len(set(text[:j])) for text, positions in zip(texts, scored) for j in positions]
    return sum(scores) / len(scores)


def test_induction_guess_baseline_equals_a_brute_force_count_on_a_hand_made_batch():
    texts = ["abXYZcaXYZ", "pqrsABpqAB", "xyzxyz"]
    scored = [[8, 9], [8, 9], [4, 5]]  # the symbols of each recurrence after its first
    # by hand: 'Y' after {a, b, X, Y, Z, c}: 1/6, 'Z' after the same: 1/6 | 1/6, 1/6 | 1/3, 1/3
    expected = (4 / 6 + 2 / 3) / 6
    assert brute_force_guess_baseline(texts, scored) == pytest.approx(expected)
    tokens, mask = data.encode_episodes(data.INDUCTION_TOKENIZER, 12, list(zip(texts, scored)))
    assert data.induction_guess_baseline(tokens, mask) == pytest.approx(expected)
    ds = data.load_data("induction:names=2,name_len=5,length=40")  # generated episodes
    texts = [data.INDUCTION_TOKENIZER.decode(e[1:]) for e in ds.episodes["val"][:200]]
    scored = [[j - 1 for j in np.nonzero(s)[0]] for s in ds.scored["val"][:200]]
    assert all(len(p) == 8 for p in scored)  # 2 names x 4 symbols after the cue
    assert data.induction_guess_baseline(ds.episodes["val"][:200], ds.scored["val"][:200]) == pytest.approx(
        brute_force_guess_baseline(texts, scored))
    assert ds.no_skill("val")["chance"] == 1 / 62 and ds.no_skill("val")["guess_seen"] < 0.1


def test_polynomial_no_skill_baselines():
    ds = data.load_data("polynomial")
    base = ds.no_skill("val")
    assert base["chance"] == 7 ** -5 and base["chance_per_digit"] == 1 / 7
    assert 1 / 7 <= base["common_digit_per_digit"] < 0.3 and base["common_digit"] < 0.01
    answers = np.stack([e[s] for e, s in zip(ds.episodes["val"], ds.scored["val"])]) - ds.tokenizer.stoi["0"]
    zeros = (answers == 0).mean()  # products make 0 the most common digit: the baseline predicts it everywhere
    assert base["common_digit_per_digit"] == pytest.approx(zeros, abs=0.02)


def test_configured_task_names_and_their_one_line_errors():
    assert "polynomial:ops=+,m=1,ood=2" in data.TASKS and "induction" in data.TASKS and "poly" not in data.TASKS
    ds = data.load_data("polynomial:ops=+,m=1,ood=2")
    assert ds.E == 8 * 2 + 13 and set(ds.splits) == {"train", "val", "val:ood"}
    assert all("+" in ds.tokenizer.decode(e) and "*" not in ds.tokenizer.decode(e) for e in ds.episodes["val"][:50])
    for bad, message in [("polynomial:ops=", "non-empty set"), ("polynomial:m=2-3,ood=3", "more operations"),
                         ("induction:names=0", "at least 1 name"), ("induction:names=x", "whole number"),
                         ("induction:names=9,name_len=7", "fewer distinct names"),
                         ("polynomial:loss=some", "loss must be"), ("polynomial:m=0", "1 <= low")]:
        with pytest.raises(UserError, match=message):
            data.load_data(bad)
    with pytest.raises(UserError, match="own tokenizer"):
        data.load_data("induction", "bytes")
