"""Helpers of the evaluation tests: tiny exported models and a test double of the LLM judge (no tests here).

``RuleBasedJudge`` is a TEST DOUBLE of an external OpenAI-compatible chat completions endpoint: a real HTTP
server on loopback (stdlib ``http.server`` in a thread) that answers the evaluation's prompts with fixed,
rule-based replies, so the client, the prompts' round trip and the parsing are exercised without a model:

* acceptability prompts: valid (1) unless the proposed or the reference token contains a digit;
* atomic-fact prompts: one fact per complete sentence (ending with a period) of the text;
* support prompts: True when every word of the statement occurs in the passages, else False.

Requests whose model name starts with "flaky" get HTTP 429 on their first attempt, to exercise retries.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from lacy_stream.eval.chat_endpoint import ChatEndpoint
from lacy_stream.models.hf_export import export_hf
from lacy_stream.inference.loading import LacyModel, load_lacy
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.tokenizer import Tokenizer

TINY_CONTEXT = 64

_ACCEPTABILITY_SLOTS = re.compile(
    r"# Your Task\n\*\*starting_text\*\*: ’(.*)’\n\*\*proposed_next_token\*\*: ’(.*)’\n"
    r"\*\*reference_next_token\*\*: ’(.*)’\n\*\*explanation\*\*:$",
    re.DOTALL,
)


def tiny_lacy(
    tokenizer_path: str, directory: Path, *, seed: int, call_scale: float = 1.0, max_seq_len: int = TINY_CONTEXT
) -> LacyModel:
    """A seeded tiny model, exported to ``directory`` and loaded back as a LaCy model.

    ``call_scale`` multiplies the ``<CALL>`` row of the tied output embedding: the larger, the more often
    ``<CALL>`` has the top logit.
    """
    tokenizer = Tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    model = Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    with torch.no_grad():
        model.tok_embeddings.weight[tokenizer.call_id] *= call_scale
    export_hf(model, tokenizer_path, directory)
    return load_lacy(directory)


def one_token_partner(tokenizer_path: str, directory: Path, piece: str) -> Path:
    """A tiny Hugging Face export whose next token is ``piece`` after any text, to serve as cascade partner.

    The final LayerNorm maps every hidden state to the first unit vector, so the (tied) output projection
    reads the embedding's first column: ``piece`` gets logit 10, every other token 0 (still on top after a
    repetition penalty).
    """
    tokenizer = Tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=TINY_CONTEXT))
    token = next(token for token in range(tokenizer.num_pieces) if tokenizer.id_to_piece(token) == piece)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0
        model.tok_embeddings.weight[:, 0] = 0.0
        model.tok_embeddings.weight[token, 0] = 10.0
    return export_hf(model, tokenizer_path, directory)


def acceptability_rule(proposed: str, reference: str) -> int:
    return 0 if any(character.isdigit() for character in proposed + reference) else 1


def _reply(prompt: str) -> str:
    if prompt.startswith("# Task"):
        slots = _ACCEPTABILITY_SLOTS.search(prompt)
        if slots is None:
            return "I cannot read this prompt."
        return f"**explanation**: rule-based test double.\n**output**: {acceptability_rule(slots[2], slots[3])}"
    if prompt.startswith("Break the following text"):
        text = prompt.split("\n\nText: ", 1)[1]
        sentences = [sentence.strip() for sentence in re.split(r"(?<=\.)\s+", text) if sentence.strip().endswith(".")]
        return "\n".join(f"- {sentence}" for sentence in sentences)
    if prompt.startswith("Below are passages"):
        passages, statement = prompt.rsplit("\nStatement: ", 1)
        known = set(re.findall(r"\w+", passages.lower()))
        return "True" if set(re.findall(r"\w+", statement.lower())) <= known else "False"
    return "unknown prompt"


class RuleBasedJudge:
    """TEST DOUBLE of an OpenAI-compatible chat completions endpoint (see the module docstring)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.rejected_once: set[str] = set()
        judge = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with lock:
                    flaky = body["model"].startswith("flaky") and prompt not in judge.rejected_once
                    if flaky:
                        judge.rejected_once.add(prompt)
                    else:
                        judge.prompts.append(prompt)
                if flaky:
                    self._send(429, {"error": {"message": "rate limited"}})
                elif body["model"] == "broken":
                    self._send(400, {"error": {"message": "no such model"}})
                else:
                    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": _reply(prompt)}}]}
                    self._send(200, reply)

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"

    def endpoint(self, model: str = "rule-based-test-double", **options) -> ChatEndpoint:
        return ChatEndpoint(url=self.url, model=model, backoff_s=0.0, **options)

    def __enter__(self) -> "RuleBasedJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
