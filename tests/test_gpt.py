"""The shared GPT core: causality, the KV cache, hidden states, and that it can learn."""
import pytest
import torch

from gpt import GPT, GPTConfig, KVCache, UserError

CONFIGS = [dict(pos="rope"), dict(pos="learned"), dict(pos="rope", qk_norm=True)]


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("kw", CONFIGS, ids=["rope", "learned", "qknorm"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 50, (2, 16))
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
        a, _ = model(idx)
        b, _ = model(changed)
        assert torch.equal(a[:, :t + 1], b[:, :t + 1])
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])  # the change is visible where it should be


@pytest.mark.parametrize("kw", CONFIGS, ids=["rope", "learned", "qknorm"])
def test_cached_greedy_generation_equals_uncached_token_for_token(kw):
    model = tiny(**kw)
    prompt = torch.randint(0, 50, (3, 5))
    # 30 new tokens: the 16-token window fills and slides, so the re-encoding path is exercised too
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # reference: the plain definition, argmax of a full forward over the last block_size tokens
    ref = prompt
    for _ in range(30):
        logits, _ = model(ref[:, -16:])
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, ref)


def test_cache_with_several_new_tokens_matches_full_forward_and_crop_rolls_back():
    model = tiny()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)
    cache = KVCache(2)
    first, _ = model(idx[:, :5], cache=cache)
    rest, _ = model(idx[:, 5:], cache=cache)  # 7 queries after 5 cached keys: needs the offset causal mask
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    cache.crop(8)
    assert len(cache) == 8
    again, _ = model(idx[:, 8:], cache=cache)
    torch.testing.assert_close(again, full[:, 8:], rtol=1e-5, atol=1e-5)


def test_hidden_states_are_the_forward_pass_pieces():
    model = tiny()
    idx = torch.randint(0, 50, (2, 10))
    hs = model.hidden_states(idx)
    assert len(hs["layers"]) == 3 and len(hs["attn"]) == 2 and len(hs["mlp"]) == 2
    # residual stream: layer i = layer i-1 + attention output + MLP output
    for i in range(2):
        torch.testing.assert_close(hs["layers"][i + 1], hs["layers"][i] + hs["attn"][i] + hs["mlp"][i])
    logits, _ = model(idx)
    torch.testing.assert_close(model.lm_head(hs["final"]), logits)


def test_weights_are_tied_and_initialised_like_gpt2():
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=1000))
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    proj = model.blocks[0].mlp.c_proj.weight.std().item()
    assert abs(proj - 0.02 / (2 * 8) ** 0.5) < 0.001


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    x = torch.randint(0, 64, (4, 32))
    y = torch.randint(0, 64, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # from ln(64) = 4.16 at the start


def test_too_long_input_and_bad_config_are_user_errors():
    model = tiny()
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="pos"):
        GPT(GPTConfig(pos="alibi"))
    with pytest.raises(UserError, match="heads"):
        GPT(GPTConfig(n_embd=30, n_head=4))
