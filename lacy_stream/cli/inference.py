"""``generate``: greedy generation by a trained model, its calls answered by a cascade partner."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..inference.call_policy import POLICY_NAMES, policy_from_name


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="the small model: a run, Hugging Face export or checkpoint directory")
    parser.add_argument("--cascade", help="partner: hf:DIR, openai:URL#MODEL (key from OPENAI_API_KEY) or lacy:PATH")
    parser.add_argument("--policy", choices=POLICY_NAMES, default="argmax", help="when a step is a call")
    parser.add_argument("--call-rate", type=float, default=0.15, help="target call rate (calibrated, ilacy-*) or random rate")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--background", help="a text file of background for the partner's RAG prompt")
    parser.add_argument("--person", help="the person the background is about (default: from 'Tell me a bio of NAME.')")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a file with one prompt per line")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    parser.add_argument("--device", default="cpu", help="torch device of the model and a local partner")
    parser.add_argument("--json", action="store_true", help="print one JSON object: generations and the policy's state")


def run_generate(args: argparse.Namespace) -> int:
    from ..inference.generate import generate, render
    from ..inference.loading import load_lacy
    from ..inference.partners import (
        Cascade,
        RagPartner,
        RagPrompt,
        partner_from_spec,
        person_from_prompt,
    )

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("generate: give --prompt or --prompts-file")
    if args.background and not args.cascade:
        raise SystemExit("generate: --background needs --cascade")
    background = Path(args.background).read_text() if args.background else None
    lacy = load_lacy(args.ckpt, device=args.device)
    partner = partner_from_spec(args.cascade, device=args.device) if args.cascade else None
    policy = policy_from_name(args.policy, lacy.tokenizer, args.call_rate, seed=args.seed)
    generations = []
    for prompt in prompts:
        delegate = None
        if partner is not None:
            prompted = partner
            if background is not None:
                person = args.person or person_from_prompt(prompt)
                if person is None:
                    raise SystemExit(f"generate: --background needs --person for the prompt {prompt!r}")
                prompted = RagPartner(partner, RagPrompt(person, background))
            delegate = Cascade(prompted, lacy.tokenizer)
        generation = generate(
            lacy.model,
            lacy.tokenizer,
            prompt,
            policy,
            delegate=delegate,
            max_new_tokens=args.max_new_tokens,
            repetition_penalty=args.repetition_penalty,
        )
        generations.append(generation)
        if not args.json:
            print(render(generation, lacy.tokenizer, color=sys.stdout.isatty()))
            print(
                f"-- {generation.calls} calls in {generation.steps} steps ({generation.call_rate:.1%}), "
                f"{generation.tokens_per_second:.1f} tokens/s" + (", stopped at EOS" if generation.stopped_at_eos else "")
                + "\n"
            )
    if args.json:
        print(json.dumps({"generations": [g.report(lacy.tokenizer) for g in generations], "policy": policy.state_dict()}))
    elif len(generations) > 1:
        print(f"all prompts: {policy.calls} calls in {policy.steps} steps ({policy.call_rate:.1%})")
    return 0
