"""Generation speed with and without the KV cache, and in a cascade, measured side by side in one run.

    python scripts/bench_generate.py --ckpt runs/tiny-cpu
    python scripts/bench_generate.py --ckpt runs/334m-lacy --cascade hf:/models/Llama-3.2-1B --device cuda --json

Each round generates every prompt once per variant, the variants alternating, so a noisy machine slows
them alike; the report gives each variant's tokens/s per round and the median ratios to the cached run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lacy_stream.inference.call_policy import NeverCall, policy_from_name
from lacy_stream.inference.generate import generate
from lacy_stream.inference.loading import load_lacy
from lacy_stream.inference.partners import Cascade, partner_from_spec

PROMPTS = (
    "Tell me a bio of Ada Lovelace. Ada Lovelace is",
    "Tell me a bio of Alan Turing. Alan Turing is",
    "Tell me a bio of Marie Curie. Marie Curie is",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a run, checkpoint or Hugging Face export directory")
    parser.add_argument("--cascade", help="also time a cascade with this partner (hf:DIR, openai:URL#MODEL, lacy:PATH)")
    parser.add_argument("--policy", default="calibrated", help="the cascade's call policy")
    parser.add_argument("--call-rate", type=float, default=0.15)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    lacy = load_lacy(args.ckpt, device=args.device)
    variants = {
        "kv_cache": lambda prompt: generate(lacy.model, lacy.tokenizer, prompt, NeverCall(),
                                            max_new_tokens=args.max_new_tokens),
        "recompute": lambda prompt: generate(lacy.model, lacy.tokenizer, prompt, NeverCall(),
                                             max_new_tokens=args.max_new_tokens, kv_cache=False),
    }
    if args.cascade:
        delegate = Cascade(partner_from_spec(args.cascade, device=args.device), lacy.tokenizer)
        policy = policy_from_name(args.policy, lacy.tokenizer, args.call_rate)
        variants["cascade"] = lambda prompt: generate(lacy.model, lacy.tokenizer, prompt, policy, delegate=delegate,
                                                      max_new_tokens=args.max_new_tokens)
    for run in variants.values():  # warm-up, untimed
        run(PROMPTS[0])

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            started, tokens = time.perf_counter(), 0
            for prompt in PROMPTS:
                tokens += len(run(prompt).ids)
            rates[name].append(tokens / (time.perf_counter() - started))
    report = {
        "tokens_per_s": {name: [round(rate, 1) for rate in values] for name, values in rates.items()},
        "ratio_to_kv_cache": {
            name: round(statistics.median(rate / cached for rate, cached in zip(values, rates["kv_cache"])), 3)
            for name, values in rates.items()
        },
        "max_new_tokens": args.max_new_tokens,
        "prompts": len(PROMPTS),
    }
    if args.json:
        print(json.dumps(report))
        return
    for name, values in rates.items():
        print(f"{name:>10}: {', '.join(f'{rate:.1f}' for rate in values)} tokens/s "
              f"(median ratio to kv_cache {report['ratio_to_kv_cache'][name]:.2f})")


if __name__ == "__main__":
    main()
