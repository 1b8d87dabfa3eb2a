"""What the test modules share (their fixtures are in conftest.py); no tests here.

* paths: the checkout, and the paper's data in ``../shared`` (``LACY_SHARED_DIR``; tests that read it are marked
  ``needs_shared``);
* synthetic corpora: shards of random sentences with a manifest, and a corpus with LLM-judge markup;
* the command line in a subprocess, the markdown tables it prints, and the overrides of a tiny training run on
  the CPU;
* processes joined in a gloo group;
* a toy model with its optimizer and scheduler, for checkpoint round trips;
* tiny exported models and test doubles of the services the evaluation and the cascade talk to.

The trainer and transformers are imported by the helpers that use them: conftest, the kernel tests under the lowest
supported triton and every spawned gloo rank import this module, and need neither.

``RuleBasedJudge`` is a TEST DOUBLE of an external OpenAI-compatible chat completions endpoint: a real HTTP
server on loopback (stdlib ``http.server`` in a thread) that answers the evaluation's prompts with fixed,
rule-based replies, so the client, the prompts' round trip and the parsing are exercised without a model:

* acceptability prompts: valid (1) unless the proposed or the reference token contains a digit;
* atomic-fact prompts: one fact per complete sentence (ending with a period) of the text;
* support prompts: True when every word of the statement occurs in the passages, else False.

Requests whose model name starts with "flaky" get HTTP 429 on their first attempt, to exercise retries.

``CompletionServer`` is an OpenAI-compatible completions server on loopback that runs a real Hugging Face causal
LM. It serves the part of vLLM's ``POST /v1/completions`` that cascade partners use: ``max_tokens`` greedy
tokens, the ``logprobs`` most likely tokens at each with their log-probabilities, and vLLM's
``repetition_penalty`` (applied with transformers' own logits processor, independent of lacy-stream's).
Token texts are what each token adds to the decoded text, as vLLM's incremental detokenizer reports them.
A prompt longer than the model's positions keeps its last tokens (vLLM does so with truncate_prompt_tokens).
A request for another model is answered 404, as vLLM does. Requests are served one at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset
from torch import nn

from lacy_stream.checkpoint import capture_rng_state
from lacy_stream.config.job_config import load_job_config
from lacy_stream.eval.chat_endpoint import ChatEndpoint
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lacy_stream.inference.loading import LacyModel

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("LACY_SHARED_DIR", REPO.parent / "shared"))


# --- synthetic corpora -----------------------------------------------------------------------------------------

WORDS = (
    "the river city museum was founded in by a painter who studied law at university and later moved to "
    "Paris where she met the composer Wolfgang Amadeus Mozart during winter of council committee born died "
    "Dr Professor number bridge station island mountain village king queen war treaty company"
).split()


def synthetic_text(rng: random.Random, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + f" in {rng.randint(1000, 2024)}.")
    return " ".join(lines)


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, mtime=0) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.write_bytes(tar_bytes(samples))


def write_manifest(directory: Path, names: list[str], documents: list[int]) -> None:
    shards = []
    for name, count in zip(names, documents):
        data = (directory / name).read_bytes()
        shards.append({"name": name, "documents": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "lacy-stream-shards", "version": 1, "documents": sum(documents), "shards": shards}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def make_corpus(directory: Path, shards: int, docs_per_shard: int | list[int], seed: int = 0) -> dict[str, str]:
    """Shards of synthetic documents plus a manifest; returns key -> text of every document."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    counts = docs_per_shard if isinstance(docs_per_shard, list) else [docs_per_shard] * shards
    texts, names = {}, []
    for shard, count in enumerate(counts):
        samples = []
        for index in range(count):
            key = f"{shard:03d}{index:05d}"
            text = synthetic_text(rng, rng.randint(1, 12))
            texts[key] = text
            samples.append((key, {"txt": text.encode(), "json": json.dumps({"id": key, "title": None}).encode()}))
        name = f"part-{shard:06d}.tar"
        write_tar(directory / name, samples)
        names.append(name)
    write_manifest(directory, names, counts)
    return texts


PEOPLE = ["Ada Lovelace", "Marie Curie", "Alan Turing", "Emmy Noether", "Niels Bohr", "Lise Meitner"]
CITIES = ["Paris", "Warsaw", "London", "Vienna", "Copenhagen", "Berlin"]


def judged_document(rng: random.Random, index: int) -> tuple[str, str]:
    """A document and its LLM-judge markup: the birth year and city of a person are delegated."""
    person, city, year = PEOPLE[index % len(PEOPLE)], rng.choice(CITIES), rng.randint(1800, 1950)
    before = f"{person} was born in "
    after = " " + synthetic_text(rng, rng.randint(2, 6))
    text = f"{before}{year} in {city}.{after}"
    annotated = (f"{before}[dblookup('{person}', 'birth year') -> {year}] {year} in "
                 f"[dblookup('{person}', 'birth place') -> {city}] {city}.{after}")
    return text, annotated


def make_judged_corpus(directory: Path) -> Path:
    """Two shards of six judged documents each (``annotated_text`` in their metadata), plus a manifest."""
    rng = random.Random(3)
    names = []
    for shard in range(2):
        samples = []
        for index in range(6):
            text, annotated = judged_document(rng, index)
            meta = {"id": f"{shard}-{index}", "annotated_text": annotated}
            samples.append((f"{shard:03d}{index:05d}", {"txt": text.encode(), "json": json.dumps(meta).encode()}))
        names.append(f"judged-{shard:06d}.tar")
        write_tar(directory / names[-1], samples)
    write_manifest(directory, names, [6, 6])
    return directory


# --- the command line and tiny training runs -------------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``lacy-stream ARGS`` in a subprocess, as a user runs it; with ``check``, a non-zero exit fails the test."""
    result = subprocess.run(
        [sys.executable, "-m", "lacy_stream", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)},  # this checkout, from any cwd
    )
    if check and result.returncode != 0:
        raise AssertionError(f"lacy-stream {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def table_rows(output: str, header: list[str]) -> list[list[str]]:
    """The cells of the markdown table with ``header`` in ``output``."""
    lines = output.splitlines()
    start = lines.index("| " + " | ".join(header) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip()[1:-1].split("|")])
    return rows


def overrides(corpus: Path, tokenizer_path: str, run_dir: Path, *extra: str) -> list[str]:
    """The command-line overrides of a tiny training run on the CPU (no annotation), then ``extra``."""
    return [
        f"--data.shards={corpus}",
        f"--tokenizer.path={tokenizer_path}",
        f"--train.run_dir={run_dir}",
        "--model.preset=tiny",
        "--model.max_seq_len=32",
        "--data.seq_len=32",
        "--data.batch_size=2",
        "--data.num_workers=0",
        "--annotation.enabled=false",
        "--optimizer.lr=3e-3",
        "--optimizer.warmup_steps=2",
        "--train.log_every=1",
        *extra,
    ]


def logged(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in logged(run_dir)}


def train_on_rank(rank: int, world: int, config_args: list[str]) -> dict:
    """A training run with ``config_args`` as one rank of a gloo group (for ``spawn_gloo``)."""
    from lacy_stream.trainer.train import train

    return train(load_job_config(None, config_args))


# --- processes in a gloo group ---------------------------------------------------------------------------------


def _gloo_entry(rank: int, world: int, init_file: str, worker, args: tuple, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker, world: int, tmp_path: Path, *args) -> dict:
    """Run ``worker(rank, world, *args)`` in ``world`` processes joined in a gloo group; {rank: its result}."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_entry, args=(world, str(tmp_path / "gloo-init"), worker, args, results), nprocs=world)
        return dict(results)


# --- a toy training for checkpoints ----------------------------------------------------------------------------

TOY_STEPS = 6


def toy_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # Dropout makes the losses depend on the restored torch RNG state.
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def toy_training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = toy_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def toy_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(123)
    return [(torch.randn(4, 8, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(TOY_STEPS)]


def toy_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batch) -> float:
    inputs, targets = batch
    loss = nn.functional.mse_loss(model(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def checkpoint_extra_state(step: int, scheduler) -> dict:
    """What a trainer saves beside the model and optimizer: step, tokens, scheduler, RNG and dataloader state."""
    return {
        "step": step,
        "tokens_seen": 4096 * step,
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "dataloader": {"shard": 3, "offsets": [7, 11], "epoch": 0, "name": "train"},
    }


# --- tiny exported models and the services of the evaluation and the cascade -----------------------------------

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
    from lacy_stream.inference.loading import load_lacy
    from lacy_stream.models.hf_export import export_hf

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
    from lacy_stream.models.hf_export import export_hf

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


class _JSONHandler(BaseHTTPRequestHandler):
    """Answers in JSON and logs nothing (test output stays clean)."""

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


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

        class Handler(_JSONHandler):
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
                    self.send_json(429, {"error": {"message": "rate limited"}})
                elif body["model"] == "broken":
                    self.send_json(400, {"error": {"message": "no such model"}})
                else:
                    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": _reply(prompt)}}]}
                    self.send_json(200, reply)

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


class CompletionServer:
    """``with CompletionServer(model_dir, "tiny") as server:`` serves at ``server.base_url``."""

    def __init__(self, model_dir: str | Path, model_name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

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
    class Handler(_JSONHandler):
        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.requests.append(request)
            if request.get("model") != server.model_name:
                message = f"The model `{request.get('model')}` does not exist."
                return self.send_json(404, {"error": {"message": message}})
            self.send_json(200, server.complete(request))

    return Handler
