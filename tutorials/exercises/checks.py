"""One check per exercise: the student's function against the repository's (always through reference.py, the one
door to the repository) and, where there is one, against the definition written out independently here (a loop,
a closed form or a property); the return type and dtype the statement names; and, where the statement promises how
the answer is computed, a watch on the computation itself that counts instead of timing (compare.Tensors: the
entries every tensor operation reads and writes, the tensors alive at once; compare.Calls: the torch functions
called). Each check prints one PASS/FAIL line (compare.run) and never raises."""
import math
import weakref

import torch
import torch.nn.functional as F

import reference as ref
from compare import (Calls, Mismatch, Tensors, call, case, python_float, run, same,  # noqa: F401
                     same_function, summary, token_list)


def rng(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=rng(seed), dtype=torch.float64).to(dtype)


def randint(high, *shape, seed=0):
    return torch.randint(high, shape, generator=rng(seed))


# ============================================================================= 1. the core: RoPE and the KV cache

def rope_definition(x, cos, sin):
    """RoPE as complex multiplication: the pair (x1_i, x2_i) is the number x1_i + i x2_i, turned by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    turned = torch.complex(x1, x2) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    return torch.cat([turned.real, turned.imag], dim=-1)


def rope_tables(student):
    def body():
        cases = [(8, 16, 10000.0), (2, 1, 10000.0), (64, 40, 10000.0), (16, 9, 500.0)]
        for hs, T, base in cases:
            with case(f"head_dim {hs}, {T} positions, base {base:g}"):
                got = call(student, hs, T, base)
                if not isinstance(got, (tuple, list)) or len(got) != 2:
                    raise Mismatch(f"expected a pair (cos, sin), got {type(got).__name__}")
                i, t = torch.arange(hs // 2, dtype=torch.float64), torch.arange(T, dtype=torch.float64)
                angle = t[:, None] * base ** (-2 * i / hs)[None]                 # definition: t * theta_i
                for g, w, d, name in zip(got, ref.rope_tables(hs, T, base), (angle.cos(), angle.sin()), ("cos", "sin")):
                    same(g, w, f"{name} vs gpt.rope_tables (float32 tables, as the statement asks)")
                    same(g, d, f"{name} vs the definition {name}(t * base^(-2i/d))", atol=1e-4, dtype=None)
        return f"{len(cases)} cases match gpt.rope_tables (float32) and the definition"
    return run("1.1", "rope_tables", body)


def apply_rope(student):
    def body():
        cases = [("random (2, 3, 5, 8)", (2, 3, 5, 8), torch.float32, {}),
                 ("one position", (1, 2, 1, 16), torch.float32, {}),
                 ("float64", (1, 1, 7, 4), torch.float64, {}),
                 ("bfloat16: keep x's dtype", (2, 2, 6, 8), torch.bfloat16, dict(atol=3e-2, rtol=3e-2))]
        for n, (label, shape, dtype, tol) in enumerate(cases):
            with case(label):
                x = randn(*shape, seed=n, dtype=dtype)
                cos, sin = ref.rope_tables(shape[-1], shape[-2])
                grad = ("x",) if dtype != torch.bfloat16 else ()
                same_function(student, ref.apply_rope, dict(x=x, cos=cos, sin=sin), "vs gpt.apply_rope", grad, **tol)
                got = call(student, x, cos, sin)
                same(got, rope_definition(x.double(), cos.double(), sin.double()),
                     "vs the definition (x1 + i x2 turned by the angle)", dtype=None, **(tol or dict(atol=1e-5)))
        with case("relative position: the score of (query at 3, key at 1) must equal that of (20, 18)"):
            q, k = randn(1, 1, 1, 8, seed=10), randn(1, 1, 1, 8, seed=11)
            cos, sin = ref.rope_tables(8, 32)

            def at(v, p):
                return call(student, v, cos[p:p + 1], sin[p:p + 1])
            same((at(q, 3) * at(k, 1)).sum(), (at(q, 20) * at(k, 18)).sum(), "rotated q . rotated k", atol=1e-4)
        return f"{len(cases)} cases match gpt.apply_rope, the complex-number definition and its gradient; " \
               "scores depend on relative position only"
    return run("1.2", "apply_rope", body)


def attention_definition(q, k, v):
    """Query i of the T new ones sits at position Tk - T + i and attends to keys 0 .. Tk - T + i (a loop)."""
    T, Tk = q.shape[-2], k.shape[-2]
    rows = []
    for i in range(T):
        seen = Tk - T + i + 1
        scores = (q[..., i:i + 1, :] @ k[..., :seen, :].transpose(-1, -2)) / math.sqrt(q.size(-1))  # (.., 1, seen)
        rows.append(scores.softmax(-1) @ v[..., :seen, :])
    return torch.cat(rows, dim=-2)


FUSED_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "multi_head_attention")


def without_fused_attention(student):
    """The student's function, watched: a Mismatch if it calls F.scaled_dot_product_attention or a kernel like it
    (seen both as a torch function call and as the aten operation it dispatches to)."""
    def watched(*args):
        with Calls() as calls, Tensors() as ops:
            out = call(student, *args)
        used = [n for names in (calls.names, ops.ops) for n in sorted(names) if any(f in n for f in FUSED_ATTENTION)]
        if used:
            raise Mismatch(f"your function calls {used[0]}: the exercise is to write the attention yourself "
                           "(scores, mask, softmax, weighted sum of v)")
        return out
    return watched


def cached_attention(student):
    student = without_fused_attention(student)

    def body():
        cases = [("no cache: 5 new positions", 1, 1, 0, 5), ("one new query after 8 cached keys", 1, 2, 8, 1),
                 ("3 new queries after 4 cached keys, B = 2, 3 heads", 2, 3, 4, 3), ("2 new after 6 cached", 1, 2, 6, 2)]
        for n, (label, B, nh, cached, new) in enumerate(cases):
            with case(label):
                q, k, v, y = ref.attention_after_cache(B, nh, 8, cached, new, seed=n)
                same_function(student, attention_definition, dict(q=q, k=k, v=v), "vs the definition (softmax(q k^T "
                              "/ sqrt(d)) v over the keys each query may see)", grad=("q", "k", "v"))
                same(call(student, q, k, v), y, "vs gpt.CausalSelfAttention with a KV cache")
        with case("float64"):
            args = dict(q=randn(1, 2, 2, 4, seed=9, dtype=torch.float64), k=randn(1, 2, 7, 4, seed=10, dtype=torch.float64),
                        v=randn(1, 2, 7, 4, seed=11, dtype=torch.float64))
            same_function(student, attention_definition, args, "vs the definition", grad=("q", "k", "v"))
        return f"{len(cases) + 1} cases match gpt.CausalSelfAttention's cached attention and the definition, " \
               "values and gradients, without a fused attention kernel"
    return run("1.3", "cached_attention", body)


def generate_cached(student):
    def body():
        cases = [("B = 1, prompt 5, 10 new tokens", 1, 5, 10, "rope"), ("B = 2, prompt 1, 8 new", 2, 1, 8, "rope"),
                 ("learned positions, prompt 4, 6 new", 1, 4, 6, "learned"), ("no new tokens", 1, 3, 0, "rope")]
        for n, (label, B, T, new, pos) in enumerate(cases):
            with case(label):
                model = ref.tiny_gpt(pos=pos, seed=n)
                idx = randint(48, B, T, seed=n)
                fed = []
                hook = ref.token_embedding(model).register_forward_hook(lambda m, i, o: fed.append(i[0].shape[1]))
                try:
                    got = call(student, model, idx.clone(), new)
                finally:
                    hook.remove()
                want = ref.greedy_generate(model, idx, new, use_cache=False)
                same(got, want, "tokens vs plain greedy decoding without a cache")
                same(got, ref.greedy_generate(model, idx, new, use_cache=True), "tokens vs gpt.GPT.generate")
                if sum(fed) > T + new:
                    raise Mismatch(f"your loop fed {sum(fed)} positions through the model ({fed}): with the cache, "
                                   f"feed the prompt once, then only the newest token ({T} + {new} at most)")
        return f"{len(cases)} cases: the same tokens as greedy decoding, the prompt fed once, then one token per step"
    return run("1.4", "generate_cached", body)


# ============================================================================= 2. BrierLM

def brier_definition(x1, x2, y, max_n):
    """Brier-n per row with python lists: 1{x1 n-gram = y n-gram} + 1{x2 = y} - 1{x1 = x2}."""
    out = torch.zeros(len(y), max_n)
    for r in range(len(y)):
        for n in range(1, max_n + 1):
            a, b, c = x1[r, :n].tolist(), x2[r, :n].tolist(), y[r, :n].tolist()
            out[r, n - 1] = (a == c) + (b == c) - (a == b)
    return out


def two_sample_brier(student):
    def body():
        y = randint(3, 200, 4, seed=0)
        cases = [("200 positions, 3 symbols, n = 1..4", randint(3, 200, 4, seed=1), randint(3, 200, 4, seed=2), y, 4),
                 ("max_n = 1", randint(3, 50, 1, seed=3), randint(3, 50, 1, seed=4), randint(3, 50, 1, seed=5), 1),
                 ("rows longer than max_n", randint(2, 30, 6, seed=6), randint(2, 30, 6, seed=7),
                  randint(2, 30, 6, seed=8), 4),
                 ("max_n = 2 on rows of 5 tokens", randint(2, 40, 5, seed=10), randint(2, 40, 5, seed=11),
                  randint(2, 40, 5, seed=12), 2),
                 ("max_n = 3 on rows of 4 tokens", randint(2, 40, 4, seed=13), randint(2, 40, 4, seed=14),
                  randint(2, 40, 4, seed=15), 3),
                 ("both samples equal the reference", y, y, y, 4), ("both samples equal, reference different", y, y,
                                                                    (y + 1) % 3, 4)]
        for label, x1, x2, yy, n in cases:
            with case(label):
                args = dict(x1=x1, x2=x2, y=yy, max_n=n)
                same_function(student, ref.two_sample_estimates, args, "vs brierlm.two_sample_estimates (float32)")
                same(call(student, x1, x2, yy, n), brier_definition(x1, x2, yy, n), "vs the definition")
        with case("unbiased: the mean over 20000 draws of a known distribution must be within 5 s.e. of "
                  "2 P(y) - sum P^2"):
            p, g = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]), rng(9)
            M = 20000
            x1, x2 = (torch.multinomial(p, M, replacement=True, generator=g).view(M, 1) for _ in range(2))
            est = call(student, x1, x2, torch.ones(M, 1, dtype=torch.long), 1)
            mean, se = est.double().mean().item(), est.double().std().item() / M ** 0.5
            exact = 2 * p[1].item() - (p.double() ** 2).sum().item()
            if abs(mean - exact) > 5 * se:
                raise Mismatch(f"mean estimate {mean:.4f} ± {se:.4f}, exact Brier {exact:.4f}")
        return f"{len(cases)} cases match brierlm.two_sample_estimates and the definition; unbiased on a known P"
    return run("2.1", "two_sample_brier", body)


def exact_brier1(student):
    def body():
        cases = [("6 rows, 10 symbols", randn(6, 10, seed=0), randint(10, 6, seed=1)),
                 ("one row", randn(1, 5, seed=2), randint(5, 1, seed=3)),
                 ("very confident logits", 50 * randn(4, 7, seed=4), randint(7, 4, seed=5)),
                 ("uniform", torch.zeros(3, 8), randint(8, 3, seed=6))]
        for label, logits, y in cases:
            with case(label):
                same_function(student, ref.exact_brier1, dict(logits=logits, y=y), "vs brierlm.exact_brier1",
                              grad=("logits",))
                p = logits.double().softmax(-1)
                squared_error = ((p - F.one_hot(y, p.size(-1)).double()) ** 2).sum(-1)
                same(call(student, logits, y), 1 - squared_error, "vs the definition 1 - sum_x (P(x) - 1{x=y})^2",
                     dtype=None)
        return f"{len(cases)} cases match brierlm.exact_brier1 (values, gradients) and 1 - the squared error"
    return run("2.2", "exact_brier1", body)


def brierlm(student):
    def body():
        cases = [("a typical small model", [0.3, 0.1, 0.05, 0.01]), ("perfect", [1.0, 1.0, 1.0, 1.0]),
                 ("one Brier-n below 0", [0.3, -0.01, 0.1, 0.2]), ("a Brier-n of exactly 0", [0.4, 0.2, 0.0, 0.1]),
                 ("two negative Brier-n (the product is positive: clamp each one)", [-0.5, -0.5, 0.2, 0.2]),
                 ("n = 1", [0.25])]
        for label, briers in cases:
            with case(label):
                got = python_float(call(student, list(briers)), "returned")
                definition = 100 * math.exp(sum(map(math.log, briers)) / len(briers)) if min(briers) > 0 else 0.0
                same(got, ref.brierlm_score(briers), "vs brierlm.brierlm_from_briers")
                same(got, definition, "vs the definition 100 (prod Brier-n)^(1/n), 0 when a Brier-n <= 0")
        return f"{len(cases)} cases match brierlm.brierlm_from_briers and the definition"
    return run("2.3", "brierlm", body)


# ============================================================================= 3. MTP

class Watch:
    """Counts, while the student's function runs: trunk forwards, trunk backwards, and, each time a head starts
    (the shared unembedding is called), how many earlier heads still have a logits-sized tensor alive: their
    logits, log-probabilities or logits gradients, whether kept by autograd for a backward that has not run yet or
    by the student's own variables, lists or dicts. Every tensor created is seen (a dispatch mode) and followed by
    a weak reference, so the watch itself keeps nothing alive."""

    def __init__(self, model, vocab_size, smallest):
        self.forwards = self.backwards = self.max_held = 0
        self.head, self.held_at, self.logits = -1, None, []  # logits: (weak reference, head that was running)
        self.V, self.smallest = vocab_size, smallest
        self.hooks = [ref.trunk_first_block(model).register_forward_hook(self.on_forward),
                      ref.unembedding(model).register_forward_pre_hook(self.on_head),
                      ref.trunk_parameter(model).register_hook(self.on_backward)]
        self.tensors = Tensors(created=self.created)

    def __enter__(self):
        self.tensors.__enter__()
        return self

    def __exit__(self, *exc):
        self.tensors.__exit__(*exc)
        for h in self.hooks:
            h.remove()

    def created(self, t, storage):
        if t.dim() >= 2 and t.shape[-1] == self.V and t.numel() >= self.smallest:
            self.logits.append((weakref.ref(storage), self.head))

    def on_forward(self, *_):
        self.forwards += 1

    def on_backward(self, grad):
        self.backwards += 1

    def on_head(self, *_):
        self.head += 1
        held = {head for r, head in self.logits if head < self.head and r() is not None}
        if len(held) > self.max_held:
            self.max_held, self.held_at = len(held), self.head
        self.logits = [(r, head) for r, head in self.logits if r() is not None]


def head_by_head_backward(student):
    def body():
        cases = [("n = 4 heads", 4, False), ("n = 1: next-token prediction", 1, False),
                 ("n = 2, the last targets -1 (ignored)", 2, True)]
        for label, n, ignore in cases:
            with case(label):
                model = ref.tiny_mtp(n_future=n, n_layer=n + 2, vocab_size=97, seed=n)  # 2 trunk blocks, n heads
                x, y = randint(97, 2, 16, seed=n), randint(97, 2, 16, seed=n + 1)
                if ignore:
                    y[:, -3:] = -1
                model.zero_grad(set_to_none=True)
                want_loss = ref.mtp_efficient_backward(model, x, y)
                want = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
                model.zero_grad(set_to_none=True)
                with Watch(model, 97, smallest=2 * 97) as watch:
                    got_loss = call(student, model, x, y)
                same(python_float(got_loss, "returned"), want_loss, "total loss (the sum of the heads' losses)")
                for name, p in model.named_parameters():
                    if name in want and p.grad is None:
                        raise Mismatch(f"gradient of {name}: none (the trunk's backward, from z with the heads' "
                                       "summed gradient, must run once at the end)" if name.startswith("trunk.") else
                                       f"gradient of {name}: none")
                    if name in want:
                        same(p.grad, want[name], f"gradient of {name} vs mtp.mtp_forward_backward")
                if watch.forwards != 1:
                    raise Mismatch(f"the trunk ran {watch.forwards} times: run it once and give every head the "
                                   "same (detached) z")
                if watch.backwards != 1:
                    raise Mismatch(f"the trunk's backward ran {watch.backwards} times: let the heads' gradients "
                                   "accumulate in z_leaf.grad and backpropagate the trunk once")
                if watch.max_held > 1:
                    raise Mismatch(f"memory: when your code computed logits (call {watch.held_at + 1} of the "
                                   f"shared unembedding), logits-sized tensors of {watch.max_held} earlier heads were still alive (their "
                                   "logits, their graph kept for a later backward, or a list of them): O(n V) memory. "
                                   "Finish each head (logits, loss, backward) and keep none of its logits before the "
                                   "next head runs")
        return f"{len(cases)} cases: the loss and every gradient equal mtp.mtp_forward_backward's, one trunk " \
               "forward and backward, one head's logits at a time"
    return run("3.1", "head_by_head_backward", body)


def speculative_with(verify, model, prompt, max_new):
    """Greedy self-speculative decoding (sec. 3.2) with the student's verify step; the rest from reference.py."""
    out = prompt[0].tolist()
    target, cache = len(out) + max_new, ref.mtp_new_cache(model)
    greedy, proposals = ref.mtp_step(model, out, 0, cache)  # the prompt; the cache now holds all of it
    out, drafts, forwards, accepted = out + [greedy[-1]], proposals[-1], 1, 0
    while len(out) < target:
        m = min(1 + len(drafts), target - len(out))  # [last token, m - 1 drafts]
        start = ref.cache_length(cache)
        greedy, proposals = ref.mtp_step(model, [out[-1]] + drafts[:m - 1], start, cache)
        forwards += 1
        new = token_list(call(verify, list(drafts[:m - 1]), list(greedy)), "returned")
        if not 1 <= len(new) <= m:
            raise Mismatch(f"verify returned {len(new)} tokens for {m - 1} drafts: it must return the accepted "
                           f"drafts plus head 1's own token, 1 to {m} tokens")
        k = len(new) - 1
        ref.crop_cache(cache, start + k + 1)  # keep the last token and the k accepted drafts
        out, drafts, accepted = out + new, proposals[k], accepted + k
    return out, forwards, accepted


def verify_greedy(student):
    def body():
        cases = [("all drafts accepted", [5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),
                 ("the second draft rejected", [5, 6, 7], [5, 9, 7, 8], [5, 9]),
                 ("the first draft rejected", [1, 2, 3], [4, 2, 3, 0], [4]), ("no drafts", [], [3], [3]),
                 ("a later match after a rejection does not count", [7, 2, 3], [1, 2, 3, 4], [1]),
                 ("repeated tokens", [2, 2, 2], [2, 2, 5, 2], [2, 2, 5])]
        for label, drafts, greedy, want in cases:
            with case(f"{label}: drafts {drafts}, head 1's tokens {greedy}"):
                got = token_list(call(student, list(drafts), list(greedy)), "returned")
                if got != want:
                    raise Mismatch(f"returned {got}, expected {want}")
        total = 0
        for n, (V, new) in enumerate([(4, 16), (8, 18)]):
            with case(f"decoding with your verify step: random 4-head model, {V} symbols, {new} new tokens"):
                model = ref.tiny_mtp(n_future=4, n_layer=5, vocab_size=V, seed=10 + n).eval()
                prompt = randint(V, 1, 4, seed=n)
                got, forwards, accepted = speculative_with(student, model, prompt, new)
                greedy = ref.mtp_greedy(model, prompt, new)[0].tolist()
                if got != greedy:
                    i = next(j for j, (a, b) in enumerate(zip(got, greedy)) if a != b)
                    raise Mismatch(f"the output differs from plain greedy decoding at position {i}: yours {got[i]}, "
                                   f"greedy {greedy[i]}")
                spec, their_forwards = ref.speculative_generate(model, prompt, new)
                if got != spec[0].tolist() or forwards != their_forwards:
                    raise Mismatch(f"{forwards} forwards where mtp.speculative_generate needs {their_forwards}")
                total += accepted
        return f"{len(cases)} cases give the expected tokens; decoding with it equals greedy decoding and " \
               f"mtp.speculative_generate token for token and forward for forward ({total} drafts accepted)"
    return run("3.2", "verify_greedy", body)


# ============================================================================= 4. CALM

def energy_definition(x, y, alpha):
    """The negative energy score written as the two double sums of its definition (loops, no vectorisation)."""
    N, M = x.size(0), y.size(0)
    dist = lambda a, b: ((a - b) ** 2).sum(-1).sqrt() ** alpha  # noqa: E731 (P,)
    fit = sum(dist(x[n], y[m]) for n in range(N) for m in range(M)) / (N * M)
    spread = sum(dist(x[n], x[o]) for n in range(N) for o in range(N) if o != n) / (N * (N - 1))
    return fit * 2 - spread


def energy_loss(student):
    def body():
        cases = [("N 8, M 32, 5 positions, l 4", 8, 32, 5, 4, 1.0, torch.float32),
                 ("N 2, M 1, one position", 2, 1, 1, 3, 1.0, torch.float32),
                 ("alpha 0.5", 4, 6, 3, 2, 0.5, torch.float32), ("alpha 1.5, float64", 5, 7, 2, 3, 1.5, torch.float64)]
        for n, (label, N, M, P, l, alpha, dtype) in enumerate(cases):
            with case(label):
                x, y = randn(N, P, l, seed=n, dtype=dtype), randn(M, P, l, seed=n + 10, dtype=dtype)
                args = dict(x=x, y=y, alpha=alpha)
                same_function(student, ref.energy_loss, args, "vs calm.energy_loss", grad=("x",))
                same(call(student, x, y, alpha), energy_definition(x.double(), y.double(), alpha),
                     "vs the definition (double sums)", atol=1e-4, dtype=None)
        with case("two model samples identical (distance 0: the gradient must stay finite)"):
            x = randn(4, 3, 2, seed=5)
            x[1] = x[0]
            try:
                same_function(student, ref.energy_loss, dict(x=x, y=randn(6, 3, 2, seed=6), alpha=1.0),
                              "vs calm.energy_loss", grad=("x",))
            except Mismatch as e:
                if "value differs" in str(e) or "gradient" in str(e):
                    raise Mismatch(f"{e}. Here ||x_0 - x_1|| = 0 is a pair n != n': if you clamp, clamp the "
                                   "SQUARED distance at 1e-12 (a larger clamp such as 1e-6 changes the value by more "
                                   "than the check's 1e-5), or compute the distance so that 0 gets a finite "
                                   "gradient") from None
                raise
        with case("proper: samples of the target must score lower than a point mass at its mean or a shifted model"):
            y = randn(256, 32, 1, seed=7, dtype=torch.float64)                  # target N(0, 1), 32 positions
            scores = {name: float(call(student, x, y, 1.0).mean()) for name, x in
                      (("target", randn(256, 32, 1, seed=8, dtype=torch.float64)),
                       ("point mass at the mean", torch.zeros(256, 32, 1, dtype=torch.float64)),
                       ("shifted by 1", 1 + randn(256, 32, 1, seed=9, dtype=torch.float64)))}
            if min(scores, key=scores.get) != "target":
                raise Mismatch("the loss is not minimised by the target distribution: " +
                               ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return f"{len(cases) + 1} cases match calm.energy_loss (values, gradients) and the double-sum definition; " \
               "the target distribution scores best"
    return run("4.1", "energy_loss", body)


def kl_definition(mu, log_sigma, clip):
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension from torch.distributions, floored at clip, summed over the
    latent dimensions and averaged over everything else."""
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(normal(mu, log_sigma.exp()), normal(torch.zeros_like(mu), 1.0))
    return kl.clamp(min=clip).sum(-1).mean()


def clipped_kl(student):
    def body():
        cases = [("random (3, 5, 8), clip 0.5", (3, 5, 8), 0.5, 1.0), ("clip 0: the plain KL", (4, 6), 0.0, 1.0),
                 ("every dimension below the clip", (2, 3, 4), 5.0, 0.1), ("one latent vector (8,)", (8,), 0.5, 2.0)]
        for n, (label, shape, clip, scale) in enumerate(cases):
            with case(label):
                args = dict(mu=scale * randn(*shape, seed=n), log_sigma=0.5 * randn(*shape, seed=n + 10), clip=clip)
                same_function(student, kl_definition, args, "vs the definition (torch.distributions KL, floored)",
                              grad=("mu", "log_sigma"))
        with case("inside the autoencoder: the KL that calm.ae_loss logs"):
            ae, args = ref.tiny_autoencoder()
            tokens = randint(40, 2, 16, seed=3)
            mu, log_sigma = ref.encode(ae, tokens.view(2, -1, args.chunk_size))
            same(call(student, mu, log_sigma, args.kl_clip), ref.autoencoder_kl(ae, tokens, args),
                 "vs calm.ae_loss's kl", dtype=None)
        return f"{len(cases) + 1} cases match the definition (values, gradients) and calm.ae_loss"
    return run("4.2", "clipped_kl", body)


def param_grads(model, loss):
    """{name: gradient} of loss for every parameter of model that requires one (None where unused)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return dict(zip([n for n, _ in named], grads))


def same_param_grads(model, got_loss, want_loss, **tol):
    if not torch.is_tensor(got_loss) or not got_loss.requires_grad:
        raise Mismatch("gradient: your loss is not differentiable (built with .item(), .detach() or numpy?)")
    want = param_grads(model, want_loss)
    for name, g in param_grads(model, got_loss).items():
        if want[name] is None:
            continue
        if g is None:
            raise Mismatch(f"gradient of {name}: none reaches it")
        same(g, want[name], f"gradient of {name}", **tol)


def autoencoder_loss(student):
    def body():
        cases = [("K 4, clip 0.5, weight 1e-3", 4, 0.5, 1e-3), ("K 2, clip 0.2, weight 1", 2, 0.2, 1.0),
                 ("K 1", 1, 0.5, 0.01)]
        for n, (label, K, clip, weight) in enumerate(cases):
            with case(label):
                ae, args = ref.tiny_autoencoder(chunk_size=K, kl_clip=clip, kl_weight=weight, seed=n)
                tokens = randint(40, 2, 8, seed=n)
                chunks = tokens.view(2, -1, K)
                mu, log_sigma = ref.encode(ae, chunks)
                got = call(student, ref.decode(ae, mu), chunks, mu, log_sigma, weight, clip)
                want = ref.autoencoder_loss(ae, tokens, args)
                same(got, want, "loss vs calm.ae_loss")
                same_param_grads(ae, got, want)
        return f"{len(cases)} cases match calm.ae_loss, value and gradient of every autoencoder parameter"
    return run("4.3", "autoencoder_loss", body)


# ============================================================================= 5. dispersion

def dispersion_definition(h):
    """Mean pairwise cosine distance over i != j from the full (N, N) cosine matrix: O(N^2 d)."""
    u = h / h.norm(dim=-1, keepdim=True)
    cos = u @ u.transpose(-1, -2)
    N = h.size(-2)
    return (1 - cos)[..., ~torch.eye(N, dtype=torch.bool)].sum(-1) / (N * (N - 1))


def linear_cost(student, d=4, sizes=(256, 2048), per_entry=200, memory_per_entry=16):
    """O(N d) time and memory, counted (not timed, so a busy machine cannot change the verdict): the student's
    function runs on N = 256 and N = 2048 vectors of dimension d under a Tensors watch. Its work (entries read
    and written by every tensor operation) must stay under per_entry * N * d and grow about 8x (at most 16x;
    anything that touches the N^2 pairs, at once, row by row or in chunks, grows 64x and is stopped at the
    budget), and at most memory_per_entry * N * d entries may be alive at once."""
    work = {}
    for N in sizes:
        with case(f"O(N d): N = {N} vectors of dimension {d}"):
            def over(spent, N=N):
                return (f"time: your function did more than {spent:,} element operations ({spent / (N * d):.0f} N d) "
                        f"and was stopped; O(N d) needs about {N * d:,} x a small constant. It touches the N^2 "
                        "pairs (a pairwise matrix, torch.pdist/cdist, or a loop over rows or chunks): use the sum "
                        "of the unit vectors instead")
            with Tensors(budget=per_entry * N * d, on_budget=over) as watch:
                call(student, randn(N, d, seed=N))
            if watch.peak > memory_per_entry * N * d:
                raise Mismatch(f"memory: {watch.peak:,} entries of tensors your function created were alive at once "
                               f"(the largest tensor {watch.largest:,} entries; N d = {N * d:,}): O(N d) memory "
                               "holds no N^2 or N(N-1)/2 pairwise values")
            work[N] = watch.work
    small, large = sizes
    growth = work[large] / max(work[small], 1)
    if growth > 2 * large / small:
        raise Mismatch(f"time: your function's element operations grew {growth:.0f}x from N = {small} to N = {large} "
                       f"({large // small}x more vectors; O(N d) grows {large // small}x, O(N^2 d) "
                       f"{(large // small) ** 2}x): it touches the N^2 pairs")


def dispersion(student):
    def body():
        e = torch.eye(6)
        cases = [("20 vectors of dimension 6", randn(20, 6, seed=0)), ("sets in a batch (3, 4, 10, 6)",
                                                                       randn(3, 4, 10, 6, seed=1)),
                 ("N = 2", randn(2, 5, seed=2)), ("float64", randn(7, 3, seed=3, dtype=torch.float64)),
                 ("same direction: D = 0", torch.arange(1, 6.0)[:, None] * randn(1, 4, seed=4)),
                 ("antipodal pairs: D = N/(N-1)", torch.stack([e[0], -e[0], e[1], -e[1]])),
                 ("orthonormal: D = 1", e), ("scaled by 7.5: D must not change", 7.5 * randn(20, 6, seed=0))]
        for label, h in cases:
            with case(label):
                same_function(student, ref.dispersion_of, dict(h=h), "vs dispersion.dispersion", grad=("h",),
                              atol=1e-5)
                same(call(student, h), dispersion_definition(h.double()), "vs the definition (full cosine matrix)",
                     dtype=None, atol=1e-5)
        linear_cost(student)
        return f"{len(cases)} cases match dispersion.dispersion (values, gradients) and the definition; " \
               "time and memory grow like N d"
    return run("5.1", "dispersion", body)


def dispersion_loss(student):
    def body():
        cases = [("weight 0.1", 0.1, False), ("weight 0: exactly the cross-entropy", 0.0, False),
                 ("weight 1, some targets -1 (ignored)", 1.0, True)]
        for n, (label, weight, ignore) in enumerate(cases):
            with case(label):
                model = ref.tiny_gpt(seed=n)
                x, y = randint(48, 2, 16, seed=n), randint(48, 2, 16, seed=n + 1)
                if ignore:
                    y[0, :5] = -1
                h, logits = ref.final_hidden_and_logits(model, x)
                got = call(student, logits, y, h, weight)
                want = ref.dispersion_objective(model, x, y, weight)
                same(got, want, "loss vs dispersion.dispersion_loss")
                same_param_grads(model, got, want)
        return f"{len(cases)} cases match dispersion.dispersion_loss, value and gradient of every parameter"
    return run("5.2", "dispersion_loss", body)
