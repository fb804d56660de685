"""Generate text from a checkpoint of any objective.

    python sample.py --ckpt out/ntp/ckpt.pt --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8 --top_k 200
    python sample.py --ckpt out/mtp/ckpt.pt --speculative      (multi-token checkpoints: self-speculative decoding)
    python sample.py --ckpt out/calm/autoencoder/ckpt.pt --prompt "ROMEO:"   (an autoencoder: the round trip)

The text goes to stdout; a run longer than a few seconds also prints a progress line with an ETA to stderr.
"""
import sys

import torch

from gpt import Block
from objectives import finite_probabilities, load_model
from runtime import OneLineParser, Progress, UserError, pick_device


def count_steps(model, progress, tokens_per_step, max_new_tokens):
    """Report progress from the first Transformer block's calls: one per decoding step (GPT: 1 token, CALM: K)."""
    block = next((m for m in model.modules() if isinstance(m, Block)), None)
    steps = [0]

    def hook(*_):
        steps[0] += 1
        progress(min(max_new_tokens, steps[0] * tokens_per_step))
    return block.register_forward_hook(hook) if block is not None else None


def round_trip(model, objective, saved, tokenizer, ids, device):
    """An autoencoder does not continue text: show what it makes of the prompt, and how much survives."""
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = objective.generate(model, idx, saved, None)[0].tolist()
    same = sum(a == b for a, b in zip(ids, out))
    print(f"autoencoder checkpoint: it reconstructs text (K={saved.chunk_size} tokens <-> one vector) instead of "
          f"continuing it; the round trip of --prompt:", file=sys.stderr)
    print(f"input:  {tokenizer.decode(ids)!r}\noutput: {tokenizer.decode(out)!r}\n"
          f"{same}/{len(ids)} tokens reconstructed")


def make_parser():
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="out/ntp/ckpt.pt")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy; default 0.8 (calm: 1)")
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--speculative", action="store_true", help="self-speculative decoding (mtp checkpoints)")
    parser.add_argument("--temp_sampler", choices=["batch", "exact"], default=None,
                        help="calm checkpoints: likelihood-free temperature sampler (default: the training setting)")
    return parser


def check_flags(args, objective):
    """A flag typed for another kind of checkpoint is an error, not silently ignored."""
    if args.speculative and objective.name != "mtp":
        raise UserError(f"--speculative needs a multi-token (mtp) checkpoint; this one is {objective.name}")
    if args.temp_sampler is not None and objective.name != "calm":
        raise UserError(f"--temp_sampler is for calm checkpoints (their temperature is likelihood-free); this one "
                        f"is {objective.name}: leave it out")
    if "top_k" in args.typed and objective.name == "calm":
        raise UserError("--top_k does not apply to a calm checkpoint (it samples vectors, not tokens): use "
                        "--temperature")


def main(argv=None):
    parser = make_parser()
    try:
        args = parser.parse_args(argv)  # every number checked (runtime.NUMBER_RULES): top_k >= 1, finite T >= 0
        device = pick_device(args.device)
        model, objective, saved, tokenizer = load_model(args.ckpt, device)
        check_flags(args, objective)
        if args.temperature is None:
            args.temperature = objective.default_temperature
        for k in ("max_new_tokens", "temperature", "top_k", "speculative", "temp_sampler"):
            if getattr(args, k) is not None:
                setattr(saved, k, getattr(args, k))
        try:
            ids = tokenizer.encode(args.prompt.replace("\\n", "\n"))
        except Exception as e:
            raise UserError(f"the {tokenizer.name} tokenizer cannot encode the prompt ({e})") from None
        if not ids:
            raise UserError("the prompt is empty after tokenization")
        if not objective.language_model:
            return round_trip(model, objective, saved, tokenizer, ids, device)
        generator = torch.Generator(device).manual_seed(args.seed)
        total = args.num_samples * args.max_new_tokens
        progress = Progress("sampling", total, "tokens")
        for i in range(args.num_samples):
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            hook = None if args.speculative else count_steps(
                model, lambda n: progress(i * args.max_new_tokens + n), getattr(model, "K", 1), args.max_new_tokens)
            try:
                with finite_probabilities(args.ckpt):
                    out = objective.generate(model, idx, saved, generator)
            finally:
                if hook is not None:
                    hook.remove()
            print(tokenizer.decode(out[0].tolist()))
            if i + 1 < args.num_samples:
                print("-" * 40)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
