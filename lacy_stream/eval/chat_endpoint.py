"""Client for an OpenAI-compatible chat completions endpoint: the LLM judge of the evaluations.

The acceptability analysis (Section 3) and FactScore (Appendix B) ask a large model short questions, many
of them. Any server that speaks the OpenAI chat completions API will do (OpenAI itself, vLLM, llama.cpp,
an institutional gateway): the URL is the full chat completions URL, e.g.
``http://localhost:8000/v1/chat/completions``. Answers are requested greedily (temperature 0) so that a
rerun asks for the same judgments. Rate limits and server errors are retried with exponential backoff;
other HTTP errors fail at once, with the server's message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}
API_KEY_ENVIRONMENT_VARIABLE = "LACY_JUDGE_API_KEY"


class JudgeError(RuntimeError):
    """The endpoint did not answer, or answered with something that is not a chat completion."""


@dataclass(frozen=True)
class ChatEndpoint:
    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 2.0
    """The first wait before a retry; it doubles with every further retry."""
    workers: int = 8
    """Requests in flight at once in :meth:`complete_all`."""

    def describe(self) -> str:
        return f"{self.model} at {self.url}"

    def complete(self, prompt: str) -> str:
        """The assistant's reply to ``prompt`` as a single user message."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
            except requests.RequestException as error:
                problem = f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 200:
                return _reply_text(response, self.url)
            problem = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.status_code not in RETRIED_STATUS:
                break
        raise JudgeError(f"{self.url} ({self.model}): {problem}")

    def complete_all(self, prompts: Sequence[str]) -> list[str]:
        """Replies to ``prompts``, in order, with up to ``workers`` requests in flight."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.complete, prompts))


def _reply_text(response: requests.Response, url: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise JudgeError(f"{url}: not a chat completion ({type(error).__name__}): {response.text[:500]}") from error
    if not isinstance(content, str):
        raise JudgeError(f"{url}: the reply has no text content: {response.text[:500]}")
    return content
