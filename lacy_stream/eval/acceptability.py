"""The Section 3 analysis: accuracy and acceptability of the model's next-token proposals by loss bucket.

The paper's point (Sec. 3, Figure 3): a token's loss predicts whether the model's greedy proposal matches
the true token (accuracy), but not whether the proposal would make the text wrong. A high-loss proposal is
often an acceptable alternative for a non-fact token ("The cat" vs "The time") and rarely for a fact token
(a wrong year). Acceptability, judged by an LLM, tells the two apart; loss and accuracy cannot.

What is measured here, on held-out documents:

* every document is tokenized and labeled by the training labeler (spaCy + the paper's rules, Appendix
  A.2.1), so each target token is a fact or not exactly as the loss saw it in training;
* the model scores each document from token 1 on (the paper: "starting from token 1"), in windows of its
  context; per target: the loss with ``<CALL>`` excluded (what the model learns on non-delegated tokens)
  and the proposal, the top token besides ``<CALL>`` (what the model would write without a cascade);
* tokens are bucketed by loss, with bucket edges at loss quantiles over all tokens, the same edges for
  fact and non-fact tokens, and accuracy (proposal == target) is computed per bucket and group;
* with a judge endpoint configured, a seeded random sample of positions is judged with the paper's prompt
  (Appendix A.1): the text the model saw, its proposal and the true token. A proposal equal to the true
  token is acceptable by definition and is counted without a request. Acceptability per bucket and group
  is the share of judged positions found valid.

Without an endpoint the analysis reports accuracy only and says that acceptability was not run. The PNG
shows accuracy (left) and acceptability (right) against the mean loss of each bucket, for both groups.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..annotate.annotation import FactAnnotator
from ..annotate.labeling import DocumentLabeler
from ..inference.loading import LacyModel
from ..labels import TokenClass
from ..markdown import markdown_table
from ..shards.documents import Document
from ..tokenizer import Tokenizer
from .chat_endpoint import ChatEndpoint
from .plotting import new_figure
from .scoring import token_statistics

JUDGE_PROMPT = r"""# Task
You must evaluate whether a proposed next token is a valid continuation of a given text.

# Input
You will receive three pieces of information:
1. **starting_text**: The initial text segment
2. **proposed_next_token**: A token that could continue the starting_text
3. **reference_next_token**: A reference token for comparison

# Evaluation Criteria
The proposed_next_token is VALID if:
- Joining starting_text + proposed_next_token creates a statement that is logically and factually compatible with starting_text + reference_next_token
- The two resulting statements do not contradict each other
- The two resulting statements have similar meaning

The proposed_next_token is INVALID if:
- Joining starting_text + proposed_next_token creates a statement that contradicts, conflicts with, or significantly changes the meaning of starting_text + reference_next_token

# Output Format
Provide:
1. **explanation**: Your reasoning for the decision
2. **output**: A binary label (1 = valid, 0 = invalid)

# Examples
## Example 1: Invalid Continuation
**starting_text**: Wolfgang Amadeus Mozart\n\n (27 January 17’
**proposed_next_token**: ’6’
**reference_next_token**: ’5’
**explanation**: The proposed_next_token does not match reference_next_token. Completing with ’6’ would create Wolfgang Amadeus Mozart (27 January 176...’, while the reference creates ’...175...’. Mozart was born in 1756, and the reference token ’5’ indicates the correct continuation is 1756 (starting with 175). The digit ’6’ creates a factual conflict because it would lead to an incorrect year.
**output**: 0

## Example 2: Invalid Continuation
**starting_text**: Alan Turing was an English
**proposed_next_token**: linguist
**reference_next_token**: mathematician
**explanation**: The proposed_next_token does not match reference_next_token. Completing with linguist would create Alan Turing was an English linguist’, while the reference creates Alan Turing was an English mathematician’. This creates a significant difference in meaning. Hence the continuation is invalid.
**output**: 0

## Example 3: Valid Continuation
**starting_text**: Entre Campos (Lisbon Metro)\n\nEntre Campos station is part of the
**proposed_next_token**: metro
**reference_next_token**: Yellow
**explanation**: The proposed_next_token does not match reference_next_token, but it does not create a factual conflict. The reference would create Entre Campos station is part of the Yellow [line]’, while the proposal creates Entre Campos station is part of the metro [network/system]’. Both statements have similar meaning and are factually true and compatible - the station IS part of the Yellow line AND part of the metro system. These are not contradictory facts.
**output**: 1

# Your Task
**starting_text**: ’{}’
**proposed_next_token**: ’{}’
**reference_next_token**: ’{}’
**explanation**:"""
"""The paper's acceptability prompt (Appendix A.1) with its three ``{}`` slots: starting text, proposed
token, reference token. Words and quote characters are as printed; the line breaks of the markdown were
lost in the paper's text rendering and are restored. ``\\n`` is literal, as in the first example: newlines
of the filled-in texts are written that way too (:func:`judge_prompt`)."""

FACT_GROUP, NON_FACT_GROUP = "fact", "non-fact"
NO_JUDGE = "accuracy only: acceptability needs a judge endpoint (--judge-url and --judge-model)"
DEFINITIONS = (
    "*Accuracy*: the share of target tokens whose proposal, the model's most likely token besides `<CALL>`, is "
    "the true token. *Acceptability*: the share of judged positions whose proposal the LLM judge finds "
    "compatible with the true token (a proposal equal to it counts as acceptable)."
)
PLOT_FILE = "acceptability.png"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_VERDICT = re.compile(r"\boutput\b\W*([01])\b", re.IGNORECASE)


@dataclass(frozen=True)
class ScoredToken:
    """One target position of a held-out document, as the model saw it."""

    document: int
    context_start: int
    """Index (in the document's tokens) of the first token of the model's context window."""
    position: int
    """Index of the target token in the document's tokens."""
    target: int
    proposal: int
    """The model's top token besides ``<CALL>``."""
    loss: float
    """NLL of the target with ``<CALL>`` excluded from the softmax."""
    is_fact: bool

    @property
    def group(self) -> str:
        return FACT_GROUP if self.is_fact else NON_FACT_GROUP


@dataclass
class BucketRow:
    group: str
    bucket: int
    loss_from: float
    loss_to: float
    mean_loss: float
    tokens: int
    accuracy: float
    judged: int
    """Positions of this row with a verdict (exact matches included)."""
    acceptability: float | None


@dataclass
class AcceptabilityResult:
    documents: int
    tokens: int
    fact_tokens: int
    accuracy: float
    judge: str | None
    """The judge endpoint, or None when acceptability was not run."""
    judged_tokens: int
    judge_requests: int
    """Judged positions whose proposal differed from the target, the ones sent to the judge."""
    unparsed_replies: int
    """Replies without a readable 0/1 verdict; those positions count as not judged."""
    acceptability: float | None
    rows: list[BucketRow]
    plot: str
    note: str

    @property
    def not_run(self) -> str | None:
        """Why the acceptability half did not run; None when it did."""
        return None if self.judge is not None else NO_JUDGE

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            f"{self.tokens} tokens of {self.documents} documents ({self.fact_tokens} fact tokens); "
            f"accuracy {self.accuracy:.4f}"
            + (f", acceptability {self.acceptability:.4f}" if self.acceptability is not None else "")
            + ".",
            "",
            self.note,
            "",
            DEFINITIONS,
            "",
            markdown_table(
                ["group", "bucket", "loss range", "mean loss", "tokens", "accuracy", "judged", "acceptability"],
                [
                    [row.group, row.bucket, f"{row.loss_from:.2f}–{row.loss_to:.2f}", f"{row.mean_loss:.2f}",
                     row.tokens, f"{row.accuracy:.3f}", row.judged,
                     "–" if row.acceptability is None else f"{row.acceptability:.3f}"]
                    for row in self.rows
                ],
            ),
            "",
            f"![accuracy and acceptability by loss bucket]({self.plot})",
        ]
        return "\n".join(lines)


def evaluate_acceptability(
    lacy: LacyModel,
    texts: Sequence[str],
    *,
    out_dir: str | Path,
    endpoint: ChatEndpoint | None = None,
    spacy_model: str = "en_core_web_sm",
    buckets: int = 10,
    judged_tokens: int = 2000,
    batch_size: int = 8,
    seed: int = 0,
) -> AcceptabilityResult:
    """The Section 3 analysis of ``lacy`` on ``texts``; writes the plot to ``out_dir``.

    At most ``judged_tokens`` positions (a seeded random sample) are judged, when ``endpoint`` is given.
    """
    documents = label_documents(lacy.tokenizer, texts, spacy_model)
    scored = score_documents(lacy, documents, batch_size=batch_size)
    if not scored:
        raise ValueError("no target tokens: the held-out documents are empty or single tokens")
    verdicts: dict[int, int] = {}
    requests = unparsed = 0
    if endpoint is not None:
        sample = sorted(random.Random(seed).sample(range(len(scored)), min(judged_tokens, len(scored))))
        asked = [index for index in sample if scored[index].proposal != scored[index].target]
        verdicts = {index: 1 for index in sample if scored[index].proposal == scored[index].target}
        prompts = [_prompt_for(lacy.tokenizer, documents[scored[index].document], scored[index]) for index in asked]
        for index, reply in zip(asked, endpoint.complete_all(prompts)):
            verdict = parse_verdict(reply)
            if verdict is None:
                unparsed += 1
            else:
                verdicts[index] = verdict
        requests = len(asked)
    rows = bucket_rows(scored, verdicts, buckets=buckets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_rows(rows, out_dir / PLOT_FILE, acceptability_run=endpoint is not None)
    if endpoint is None:
        note = "Acceptability was not run: no judge endpoint configured (--judge-url and --judge-model)."
    else:
        note = (
            f"Acceptability judged by {endpoint.describe()} on a random sample of {len(verdicts)} positions "
            f"({requests} requests; exact matches count as acceptable without one; {unparsed} unreadable replies)."
        )
    return AcceptabilityResult(
        documents=len(texts),
        tokens=len(scored),
        fact_tokens=sum(token.is_fact for token in scored),
        accuracy=sum(token.proposal == token.target for token in scored) / len(scored),
        judge=endpoint.describe() if endpoint is not None else None,
        judged_tokens=len(verdicts),
        judge_requests=requests,
        unparsed_replies=unparsed,
        acceptability=sum(verdicts.values()) / len(verdicts) if verdicts else None,
        rows=rows,
        plot=PLOT_FILE,
        note=note,
    )


def label_documents(tokenizer: Tokenizer, texts: Sequence[str], spacy_model: str) -> list[dict]:
    """Token ids and fact classes of each text, from the labeler the training data goes through."""
    annotator = FactAnnotator(spacy_model)
    annotator.nlp.max_length = max([annotator.nlp.max_length, *(len(text) + 1 for text in texts)])
    labeler = DocumentLabeler(tokenizer, annotator)
    documents = (
        (index, Document(text=text, key=str(index), url="heldout", shard=0, index=index))
        for index, text in enumerate(texts)
    )
    return [labels for _, _, labels in labeler.label(documents)]


def score_documents(lacy: LacyModel, documents: Sequence[dict], *, batch_size: int = 8) -> list[ScoredToken]:
    """Every target from token 1 on of each labeled document, scored in windows of the model's context."""
    context = lacy.model.args.max_seq_len
    chunks = [
        (number, start)
        for number, labels in enumerate(documents)
        for start in range(0, len(labels["tokens"]) - 1, context)
    ]
    scored = []
    eos_id = lacy.tokenizer.eos_id
    for first in range(0, len(chunks), batch_size):
        batch = chunks[first : first + batch_size]
        windows = [documents[number]["tokens"][start : start + context + 1] for number, start in batch]
        padded = torch.full((len(batch), max(map(len, windows))), eos_id, dtype=torch.long)
        for row, window in enumerate(windows):
            padded[row, : len(window)] = torch.as_tensor(window, dtype=torch.long)
        padded = padded.to(lacy.device)
        stats = token_statistics(lacy.model, padded[:, :-1], padded[:, 1:], call_id=lacy.call_id)
        losses, proposals = (-stats.no_call_logprob).tolist(), stats.top_token.tolist()
        for row, ((number, start), window) in enumerate(zip(batch, windows)):
            classes = documents[number]["token_class"]
            for offset in range(len(window) - 1):
                position = start + offset + 1
                scored.append(
                    ScoredToken(
                        document=number,
                        context_start=start,
                        position=position,
                        target=int(window[offset + 1]),
                        proposal=proposals[row][offset],
                        loss=losses[row][offset],
                        is_fact=int(classes[position]) == TokenClass.FACT,
                    )
                )
    return scored


def bucket_rows(scored: Sequence[ScoredToken], verdicts: dict[int, int], *, buckets: int) -> list[BucketRow]:
    """Accuracy and acceptability per (group, loss bucket); ``verdicts`` maps indices of ``scored`` to 0/1.

    Bucket edges are loss quantiles over all tokens, shared by both groups; empty cells are left out.
    """
    if buckets < 1:
        raise ValueError(f"need at least one loss bucket, got {buckets}")
    losses = sorted(token.loss for token in scored)
    edges = [losses[min(len(losses) - 1, len(losses) * k // buckets)] for k in range(1, buckets)]
    cells: dict[tuple[str, int], list[int]] = {}
    for index, token in enumerate(scored):
        cells.setdefault((token.group, bisect.bisect_right(edges, token.loss)), []).append(index)
    rows = []
    for group in (FACT_GROUP, NON_FACT_GROUP):
        for bucket in range(buckets):
            members = cells.get((group, bucket))
            if not members:
                continue
            judged = [verdicts[index] for index in members if index in verdicts]
            member_losses = [scored[index].loss for index in members]
            rows.append(
                BucketRow(
                    group=group,
                    bucket=bucket,
                    loss_from=min(member_losses),
                    loss_to=max(member_losses),
                    mean_loss=sum(member_losses) / len(members),
                    tokens=len(members),
                    accuracy=sum(scored[index].proposal == scored[index].target for index in members) / len(members),
                    judged=len(judged),
                    acceptability=sum(judged) / len(judged) if judged else None,
                )
            )
    return rows


def plot_rows(rows: Sequence[BucketRow], path: Path, *, acceptability_run: bool) -> None:
    """Accuracy and acceptability against mean bucket loss, one line per group (Figure 3 of the paper)."""
    figure = new_figure(figsize=(10, 4), layout="constrained")
    if figure is None:
        return
    accuracy_axes, acceptability_axes = figure.subplots(1, 2, sharey=True)
    for group, style in ((FACT_GROUP, "o-"), (NON_FACT_GROUP, "s--")):
        mine = [row for row in rows if row.group == group]
        accuracy_axes.plot([row.mean_loss for row in mine], [row.accuracy for row in mine], style, label=group)
        judged = [row for row in mine if row.acceptability is not None]
        acceptability_axes.plot(
            [row.mean_loss for row in judged], [row.acceptability for row in judged], style, label=group
        )
    accuracy_axes.set(
        title="Accuracy (top-1 = true token)", xlabel="loss bucket (mean loss)", ylabel="share", ylim=(0, 1.02)
    )
    acceptability_axes.set(title="Acceptability (LLM judge)", xlabel="loss bucket (mean loss)")
    accuracy_axes.legend()
    if acceptability_run:
        acceptability_axes.legend()
    else:
        acceptability_axes.set_xticks([])
        acceptability_axes.text(
            0.5, 0.5, "not run:\nno judge endpoint", ha="center", va="center", transform=acceptability_axes.transAxes
        )
    figure.savefig(path, dpi=120)


def judge_prompt(starting_text: str, proposed_token: str, reference_token: str) -> str:
    return JUDGE_PROMPT.format(
        *(text.replace("\n", "\\n") for text in (starting_text, proposed_token, reference_token))
    )


def parse_verdict(reply: str) -> int | None:
    """The judge's 0/1: the last "output: <digit>" of the reply, or a bare digit; None when there is neither."""
    matches = _VERDICT.findall(reply)
    if matches:
        return int(matches[-1])
    bare = reply.strip().strip("*").strip()
    return int(bare) if bare in ("0", "1") else None


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """The text a single token adds: "▁" is a space, a byte-fallback piece its byte (lossy for partial UTF-8)."""
    piece = tokenizer.id_to_piece(token)
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)]).decode("utf-8", errors="replace")
    return piece.replace("\u2581", " ")


def _prompt_for(tokenizer: Tokenizer, labels: dict, token: ScoredToken) -> str:
    context_ids = labels["tokens"][token.context_start : token.position].tolist()
    return judge_prompt(
        tokenizer.decode(context_ids), token_text(tokenizer, token.proposal), token_text(tokenizer, token.target)
    )
