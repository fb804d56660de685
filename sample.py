"""Generate text from a checkpoint of any objective.

    python sample.py --ckpt out/ntp/ckpt.pt --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8 --top_k 200
    python sample.py --ckpt out/mtp/ckpt.pt --speculative      (multi-token checkpoints: self-speculative decoding)
"""
import argparse
import sys
from types import SimpleNamespace

import torch

from data import get_tokenizer
from gpt import UserError
from train import OneLineParser, get_objective, gpt_config, load_checkpoint, pick_device


def load_model(ckpt_path, device="cpu"):
    """(model in eval mode, objective, saved args, tokenizer) from a checkpoint written by train.py."""
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    saved = SimpleNamespace(**ckpt["args"])
    objective = get_objective(ckpt["objective"])
    tokenizer = get_tokenizer(saved.tokenizer)
    model = objective["build"](gpt_config(saved, tokenizer.vocab_size), saved, None)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{ckpt_path}: weights do not match the model its own config describes") from None
    return model.to(device).eval(), objective, saved, tokenizer


def main(argv=None):
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
    try:
        args = parser.parse_args(argv)
        if args.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
        device = pick_device(args.device)
        model, objective, saved, tokenizer = load_model(args.ckpt, device)
        if args.temperature is None:
            args.temperature = objective.get("default_temperature", 0.8)
        if args.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
        for k in ("max_new_tokens", "temperature", "top_k", "speculative", "temp_sampler"):
            if getattr(args, k) is not None:
                setattr(saved, k, getattr(args, k))
        try:
            ids = tokenizer.encode(args.prompt.replace("\\n", "\n"))
        except Exception as e:
            raise UserError(f"the {tokenizer.name} tokenizer cannot encode the prompt ({e})") from None
        if not ids:
            raise UserError("the prompt is empty after tokenization")
        generator = torch.Generator(device).manual_seed(args.seed)
        for i in range(args.num_samples):
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            out = objective["generate"](model, idx, saved, generator)
            print(tokenizer.decode(out[0].tolist()))
            if i + 1 < args.num_samples:
                print("-" * 40)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
