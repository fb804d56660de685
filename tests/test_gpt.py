"""The shared GPT core: RoPE against its formula, causality, the KV cache, hidden states, and that it can learn."""
import math

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import GPT, GPTConfig, KVCache, RotatePairs, apply_rope, rope_tables
from runtime import UserError

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


def rotation_matrix(hs, t, base=10000.0):
    """RoPE's R_t from the formula (Su et al. 2021, eq. 15, with the pairs (i, i + hs/2)): a 2x2 rotation by the
    angle t * base^(-2i/hs) on each pair of coordinates, written out entry by entry in float64."""
    R = torch.zeros(hs, hs, dtype=torch.float64)
    for i in range(hs // 2):
        a = t * base ** (-2 * i / hs)
        j = i + hs // 2
        R[i, i], R[i, j], R[j, i], R[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    return R


def test_apply_rope_is_the_rotation_of_the_formula():
    hs, T = 8, 6
    x = torch.randn(2, 3, T, hs, dtype=torch.float64)
    cos, sin = rope_tables(hs, T)
    expected = torch.stack([x[:, :, t] @ rotation_matrix(hs, t).T for t in range(T)], dim=2)
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()), expected)


def pair_ordered(qkv, C, hs, inverse=False):
    """The q and k heads of qkv (..., 3C) from the definition's coordinate order to RotatePairs' order 0, hs/2, 1, ..
    (inverse: back); v as it is."""
    qk = qkv[..., :2 * C].unflatten(-1, (-1, 2, hs // 2) if not inverse else (-1, hs // 2, 2))
    return torch.cat([qk.transpose(-1, -2).flatten(-3), qkv[..., 2 * C:]], dim=-1)


@pytest.mark.parametrize("dtype, compiled", [(torch.float32, False), (torch.float64, False), (torch.float32, True),
                                             (torch.bfloat16, False)], ids=["fp32", "fp64", "real-arith", "bf16"])
def test_rotate_pairs_is_apply_rope_forward_and_backward(dtype, compiled, monkeypatch):
    # compiled: the real-arithmetic branch that torch.compile traces (no complex numbers), run here eagerly
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled)
    B, T, nh, hs = 2, 5, 3, 8
    C = nh * hs
    cos, sin = rope_tables(hs, T)
    rot = torch.stack([cos, sin], -1).repeat(1, 2 * nh, 1)  # what GPT.rope_at gives for positions 0 .. T-1
    qkv = torch.randn(B, T, 3 * C, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.split(C, dim=2)
    turned = [apply_rope(t.view(B, T, nh, hs).transpose(1, 2), cos.double(), sin.double()) for t in (q, k)]
    expected = torch.cat([t.transpose(1, 2).flatten(2) for t in turned] + [v], dim=2)  # the definition
    ordered = pair_ordered(qkv.detach(), C, hs).to(dtype).requires_grad_()
    out = RotatePairs.apply(ordered.clone(), rot)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(pair_ordered(out.double(), C, hs, inverse=True), expected.detach(), **tol)
    g = torch.randn(B, T, 3 * C, dtype=torch.float64)  # an upstream gradient, in the definition's order
    out.backward(pair_ordered(g, C, hs).to(dtype))
    (expected * g).sum().backward()
    torch.testing.assert_close(pair_ordered(ordered.grad.double(), C, hs, inverse=True), qkv.grad, **tol)


def reference_logits(model, idx):
    """The model written the plain way, with the definition: c_attn's rows as stored, apply_rope on q and k."""
    B, T = idx.shape
    cos, sin = rope_tables(model.config.n_embd // model.config.n_head, T)
    x = model.embed(idx)
    for block in model.blocks:
        att, h = block.attn, block.ln_1(x)
        q, k, v = (t.view(B, T, att.n_head, -1).transpose(1, 2) for t in att.c_attn(h).split(h.size(-1), dim=2))
        if att.q_norm is not None:
            q, k = att.q_norm(q), att.k_norm(k)
        if model.wpe is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + att.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x))


@pytest.mark.parametrize("kw", CONFIGS + [dict(pos="rope", bias=True)], ids=["rope", "learned", "qknorm", "bias"])
def test_model_equals_the_plain_definition_outputs_and_gradients(kw):
    model = tiny(**kw).train()
    ref = tiny(**kw).train()
    ref.load_state_dict(model.state_dict())
    idx, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, y)
    expected = reference_logits(ref, idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    F.cross_entropy(expected.flatten(0, 1), y.flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
