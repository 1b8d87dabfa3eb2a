"""``generate``: greedy generation by a trained model, its calls answered by a cascade partner."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..inference.call_policy import DEFAULT_CALL_RATE, DEFAULT_POLICY, POLICY_NAMES, CallPolicy, policy_from_name
from .arguments import CALL_PIECES_HELP
from .exit_status import UsageError

if TYPE_CHECKING:
    from ..inference.generate import Generation


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="the small model: a run, Hugging Face export or checkpoint directory")
    parser.add_argument("--cascade", help="partner: hf:DIR, openai:URL#MODEL (key from OPENAI_API_KEY) or lacy:PATH")
    parser.add_argument("--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY,
                        help="when a step is a call (default: %(default)s, at --call-rate of the steps; argmax: "
                             "wherever <CALL> is the top token)")
    parser.add_argument("--call-rate", type=float, default=DEFAULT_CALL_RATE,
                        help="target call rate (calibrated, ilacy-*) or random rate (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--call-pieces", type=int, metavar="N", help=CALL_PIECES_HELP)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--background", help="a text file of background for the partner's RAG prompt")
    parser.add_argument("--person", help="the person the background is about (default: from 'Tell me a bio of NAME.')")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a file with one prompt per line")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    parser.add_argument("--device", default="cpu", help="torch device of the model and a local partner")
    parser.add_argument("--json", action="store_true", help="print one JSON object: generations and the policy's state")
    parser.add_argument("--html", help="also write a page of the generations with their calls marked here")


def run_generate(args: argparse.Namespace) -> int:
    from ..inference.generate import generate, render
    from ..inference.loading import load_lacy
    from ..inference.partners import (
        Cascade,
        RagPartner,
        PartnerSpecError,
        RagPrompt,
        partner_from_spec,
        person_from_prompt,
    )

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give --prompt or --prompts-file")
    if args.call_pieces is not None and args.call_pieces < 1:
        raise UsageError(f"a call must append at least one piece, got --call-pieces {args.call_pieces}")
    if args.background and not args.cascade:
        raise UsageError("--background needs --cascade")
    background = Path(args.background).read_text() if args.background else None
    lacy = load_lacy(args.ckpt, device=args.device)
    try:
        partner = partner_from_spec(args.cascade, device=args.device) if args.cascade else None
    except PartnerSpecError as error:
        raise UsageError(str(error)) from None
    policy = policy_from_name(args.policy, lacy.tokenizer, args.call_rate, seed=args.seed)
    generations = []
    for prompt in prompts:
        delegate = None
        if partner is not None:
            prompted = partner
            if background is not None:
                person = args.person or person_from_prompt(prompt)
                if person is None:
                    raise UsageError(f"--background needs --person for the prompt {prompt!r}")
                prompted = RagPartner(partner, RagPrompt(person, background))
            delegate = Cascade(prompted, lacy.tokenizer, args.call_pieces)
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
            print(generation_summary(generation) + "\n")
    if args.html:
        from ..inference.views import generations_page

        Path(args.html).write_text(generations_page(generations, lacy.tokenizer), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps({"generations": [g.report(lacy.tokenizer) for g in generations], "policy": policy.state_dict()}))
    elif len(generations) > 1:
        print(f"all prompts: {policy.calls} calls in {policy.steps} steps ({policy.call_rate:.1%})")
    warn_of_argmax_calls(policy)
    return 0


def generation_summary(generation: Generation) -> str:
    """The line under a printed generation: its calls, the realized call rate, the speed."""
    return (f"-- {generation.calls} calls in {generation.steps} steps ({generation.call_rate:.1%}), "
            f"{generation.tokens_per_second:.1f} tokens/s" + (", stopped at EOS" if generation.stopped_at_eos else ""))


def warn_of_argmax_calls(policy: CallPolicy) -> None:
    """One line on stderr when ``argmax`` called at most steps, as it does for a briefly trained model."""
    if policy.name == "argmax" and policy.calls > policy.steps / 2:
        print(f"lacy-stream generate: warning: the argmax policy called at {policy.calls} of {policy.steps} steps "
              "(the <CALL> logit of a briefly trained model is on top nearly everywhere); --policy calibrated calls "
              f"at --call-rate ({DEFAULT_CALL_RATE:g} by default)", file=sys.stderr)
