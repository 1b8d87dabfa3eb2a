"""An OpenAI-compatible completions server on loopback that runs a real Hugging Face causal LM (tests only).

It serves the part of vLLM's ``POST /v1/completions`` that cascade partners use: ``max_tokens`` greedy
tokens, the ``logprobs`` most likely tokens at each with their log-probabilities, and vLLM's
``repetition_penalty`` (applied with transformers' own logits processor, independent of lacy-stream's).
Token texts are what each token adds to the decoded text, as vLLM's incremental detokenizer reports them.
A prompt longer than the model's positions keeps its last tokens (vLLM does so with truncate_prompt_tokens).
A request for another model is answered 404, as vLLM does. Requests are served one at a time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor


class CompletionServer:
    """``with CompletionServer(model_dir, "tiny") as server:`` serves at ``server.base_url``."""

    def __init__(self, model_dir: str | Path, model_name: str) -> None:
        self.model_name = model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.requests: list[dict[str, Any]] = []
        self._http = HTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> CompletionServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    @torch.inference_mode()
    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        ids = self.tokenizer(request["prompt"])["input_ids"]
        context = self.model.config.max_position_embeddings
        top_k = int(request.get("logprobs") or 0)
        penalty = RepetitionPenaltyLogitsProcessor(float(request.get("repetition_penalty", 1.0)))
        tokens, token_logprobs, top_logprobs = [], [], []
        for _ in range(int(request.get("max_tokens", 16))):
            ids = ids[-context:]
            logits = self.model(torch.tensor([ids])).logits[:, -1].float()
            logprobs = torch.log_softmax(penalty(torch.tensor([ids]), logits), dim=-1)[0]
            chosen = int(logprobs.argmax())
            top = logprobs.topk(top_k)
            ranked: dict[str, float] = {}
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                ranked.setdefault(self._token_text(ids, token), value)  # tokens with the same text: keep the best
            top_logprobs.append(ranked)
            tokens.append(self._token_text(ids, chosen))
            token_logprobs.append(float(logprobs[chosen]))
            ids = [*ids, chosen]
        return {
            "id": f"cmpl-{len(self.requests)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": "".join(tokens),
                    "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs},
                    "finish_reason": "length",
                }
            ],
        }

    def _token_text(self, ids: list[int], token: int) -> str:
        before = self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([*ids, token], skip_special_tokens=True)[len(before) :]


def _handler_for(server: CompletionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                return self._reply(404, {"error": {"message": f"no route {self.path}"}})
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.requests.append(request)
            if request.get("model") != server.model_name:
                return self._reply(404, {"error": {"message": f"The model `{request.get('model')}` does not exist."}})
            self._reply(200, server.complete(request))

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    return Handler
