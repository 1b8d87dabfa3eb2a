"""Publishing shards survives being killed at any step: the output directory holds the previous build or the new one,
each with a manifest that matches its shards, or a state that the next run recovers; the next run ends with the new
build and says what it recovered.

Each case runs make-shards (or annotate --shards) in a subprocess, this file run as a script, in which the file system
calls that publishing makes (renames, links, removals, the one-step swap) become a SIGKILL at the k-th one. The steps
are listed here, so that a change to the publishing protocol shows in these tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

import lacy_stream.annotate.annotate_shards as annotate_module
import lacy_stream.atomic as atomic
import lacy_stream.shards.make_shards as make_shards_module
from lacy_stream.shards.make_shards import ShardInputError, make_shards
from lacy_stream.shards.specs import expand_shard_spec

# Not from helpers: the subprocesses run this file as a script, and helpers imports the trainer and transformers.
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every case runs make-shards or annotate in a subprocess

NOTES = b"a user's notes, kept across builds\n"
OTHER_PREFIX_SHARD = b"a shard of another prefix"
OLD_TEXTS = [f"old document number {index}" for index in range(3)]
NEW_TEXTS = [f"new document number {index}" for index in range(4)]
SWAPS = ["exchange", "renames"]


def expected_steps(swap: str, carried: list[str]) -> list[str]:
    """The steps of publishing into an existing ``out`` that holds the user's files ``carried``: with the one-step swap
    of two paths, or without it (by renames)."""
    links = [f"link out/{name} .out.partial-*/{name}" for name in carried]
    if swap == "exchange":
        return [*links, "exchange .out.partial-* out", "rmtree .out.partial-*"]
    return [
        *links,
        "rename .out.partial-* .out.ready",
        "rename out .out.partial-*",
        "rename .out.ready out",
        "rmtree .out.partial-*",
    ]


MAKE_SHARDS_CARRIED = ["notes.txt", "other-000000.tar"]
KILL_POINTS = [
    pytest.param(swap, kill_at, id=f"{swap}-{kill_at}: {step}")
    for swap in SWAPS
    for kill_at, step in enumerate(expected_steps(swap, MAKE_SHARDS_CARRIED))
]


# --- the subprocess --------------------------------------------------------------------------------------------------


def run_publisher(job: dict) -> None:
    """Runs one build; once publishing has begun, kills itself with SIGKILL instead of taking step ``kill_at``.
    Prints the steps it took as JSON when it ends alive."""
    root = Path(job["root"])
    steps: list[str] = []
    publishing = inside_step = False

    def as_step(name, call):
        def step(*args, **kwargs):
            nonlocal inside_step
            if not publishing or inside_step:  # the calls inside a step (rmtree's unlinks) are part of it
                return call(*args, **kwargs)
            if len(steps) == job["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            steps.append(describe_step(name, args, root))
            inside_step = True
            try:
                return call(*args, **kwargs)
            finally:
                inside_step = False

        return step

    def publish_shards(*args, **kwargs):
        nonlocal publishing
        publishing = True
        return real_publish_shards(*args, **kwargs)

    real_publish_shards = make_shards_module.publish_shards
    make_shards_module.publish_shards = annotate_module.publish_shards = publish_shards
    for module, name in [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "link"),
                         (os, "symlink"), (shutil, "rmtree"), (shutil, "copytree")]:
        setattr(module, name, as_step(name, getattr(module, name)))
    if job["swap"] == "exchange":
        atomic._exchange = as_step("exchange", atomic._exchange)
    else:
        atomic._exchange = lambda first, second: False  # as on a file system without the one-step swap

    if job["command"] == "annotate":
        annotate_module.build_annotator = no_annotator
        annotate_module.annotate_shards(job["inputs"], job["out"], job["tokenizer"])
    else:
        make_shards_module.make_shards(job["inputs"], Path(job["out"]), docs_per_shard=job["docs_per_shard"])
    print(json.dumps(steps))


def describe_step(name: str, args: tuple, root: Path) -> str:
    paths = [os.path.relpath(arg, root) for arg in args if isinstance(arg, (str, os.PathLike))]
    return re.sub(r"\.partial-\w+", ".partial-*", " ".join([name, *paths]))


def no_annotator(*args, **kwargs) -> None:
    """Stands in for ``build_annotator``: every token is labeled ``other``, so no spaCy model is needed."""
    return None


# --- the tests -------------------------------------------------------------------------------------------------------


def run_publisher_process(job: dict) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    return subprocess.run([sys.executable, __file__, json.dumps(job)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})


def skip_without_exchange(swap: str, directory: Path) -> None:
    """Skips a case of the one-step swap where the file system of ``directory`` cannot do it."""
    if swap != "exchange":
        return
    first, second = directory / "exchange-probe-1", directory / "exchange-probe-2"
    first.mkdir()
    second.mkdir()
    supported = atomic._exchange(first, second)
    first.rmdir()
    second.rmdir()
    if not supported:
        pytest.skip(f"the file system of {directory} cannot swap two paths in one step")


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return str(path)


def add_user_files(out: Path, names: list[str]) -> dict[str, bytes]:
    files = {name: {"notes.txt": NOTES, "other-000000.tar": OTHER_PREFIX_SHARD}[name] for name in names}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def assert_holds_build(directory: Path, sources: list[str], prefix: str, user_files: dict[str, bytes]) -> dict:
    """``directory`` holds a complete build of ``sources``: a manifest, every shard it lists with the listed size
    and sha256, no other shard of ``prefix``, and the user's files; returns the manifest."""
    names = sorted(path.name for path in directory.iterdir())
    assert "manifest.json" in names, f"{directory} holds no manifest: {names}"
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sources"] == sources
    listed = [shard["name"] for shard in manifest["shards"]]
    assert [name for name in names if re.fullmatch(rf"{prefix}-\d{{6}}\.tar", name)] == listed
    for shard in manifest["shards"]:
        data = (directory / shard["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"]), shard["name"]
    for name, data in user_files.items():
        assert (directory / name).read_bytes() == data, name
    return manifest


def assert_old_or_new(
    root: Path, builds: dict[str, list[str] | None], prefix: str, user_files: dict[str, bytes]
) -> str:
    """``root/out`` holds the old or the new build whole, or is missing beside the complete new build in
    ``.out.ready``, or (before a first publication) is missing; returns which of these."""
    out, ready = root / "out", root / ".out.ready"
    if ready.exists():  # the complete new build, which the next run puts in place
        assert_holds_build(ready, builds["new"], prefix, user_files)
    if not out.exists():
        assert ready.exists() or builds["old"] is None, "the previous build is gone"
        return "ready" if ready.exists() else "none"
    assert (out / "manifest.json").exists(), f"out holds no manifest: {sorted(path.name for path in out.iterdir())}"
    sources = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sources"]
    state = next((name for name, build in builds.items() if build == sources), None)
    assert state, f"the manifest in out is of neither build: {sources}"
    assert_holds_build(out, sources, prefix, user_files)
    return state


def left_beside_out(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith(".out."))


def assert_recovered(root: Path, left: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """Nothing is left beside ``out``, and the run logged what it did with what it found there (``left``)."""
    assert left_beside_out(root) == []
    messages = [record.getMessage() for record in caplog.records if record.name == "lacy_stream.atomic"]
    for name in left:
        wanted = "putting its complete output in place" if name == ".out.ready" else name
        assert any(wanted in message for message in messages), (name, messages)


@pytest.fixture
def shard_builds(tmp_path: Path) -> dict:
    """``tmp_path/out`` holds the old build (3 shards), the user's notes and a shard of another prefix; the new
    build (2 shards, with the names of the old first two) is known from a build elsewhere."""
    old_input = write_jsonl(tmp_path / "old.jsonl", OLD_TEXTS)
    new_input = write_jsonl(tmp_path / "new.jsonl", NEW_TEXTS)
    new = make_shards([new_input], tmp_path / "expected", docs_per_shard=2)
    make_shards([old_input], tmp_path / "out", docs_per_shard=1)
    return {
        "builds": {"old": [old_input], "new": [new_input]},
        "new_manifest": new,
        "user_files": add_user_files(tmp_path / "out", MAKE_SHARDS_CARRIED),
        "job": {"command": "make_shards", "root": str(tmp_path), "inputs": [new_input], "out": str(tmp_path / "out"),
                "docs_per_shard": 2},
    }


def rebuild(shard_builds: dict, caplog: pytest.LogCaptureFixture) -> dict:
    job = shard_builds["job"]
    with caplog.at_level(logging.INFO):
        return make_shards(job["inputs"], Path(job["out"]), docs_per_shard=job["docs_per_shard"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("swap", SWAPS)
def test_publishing_takes_the_listed_steps(tmp_path: Path, shard_builds: dict, swap: str) -> None:
    skip_without_exchange(swap, tmp_path)
    result = run_publisher_process({**shard_builds["job"], "swap": swap, "kill_at": None})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == expected_steps(swap, MAKE_SHARDS_CARRIED)
    manifest = assert_holds_build(tmp_path / "out", shard_builds["builds"]["new"], "shard", shard_builds["user_files"])
    assert manifest == shard_builds["new_manifest"]
    assert left_beside_out(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("swap, kill_at", KILL_POINTS)
def test_make_shards_killed_at_each_step_of_the_swap(
    tmp_path: Path, shard_builds: dict, swap: str, kill_at: int, caplog: pytest.LogCaptureFixture
) -> None:
    skip_without_exchange(swap, tmp_path)
    killed = run_publisher_process({**shard_builds["job"], "swap": swap, "kill_at": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    assert_old_or_new(tmp_path, shard_builds["builds"], "shard", shard_builds["user_files"])
    left = left_beside_out(tmp_path)
    assert rebuild(shard_builds, caplog) == shard_builds["new_manifest"]
    assert_holds_build(tmp_path / "out", shard_builds["builds"]["new"], "shard", shard_builds["user_files"])
    assert_recovered(tmp_path, left, caplog)


@pytest.mark.timeout(60)
def test_a_killed_first_publication_leaves_no_output_and_the_next_run_builds_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new_input = write_jsonl(tmp_path / "new.jsonl", NEW_TEXTS)
    job = {"command": "make_shards", "root": str(tmp_path), "inputs": [new_input], "out": str(tmp_path / "out"),
           "docs_per_shard": 2, "swap": "renames", "kill_at": 0}
    killed = run_publisher_process(job)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert assert_old_or_new(tmp_path, {"old": None, "new": [new_input]}, "shard", {}) == "none"
    left = left_beside_out(tmp_path)
    assert left and all(name.startswith(".out.partial-") for name in left)

    with caplog.at_level(logging.INFO):
        make_shards([new_input], tmp_path / "out", docs_per_shard=2)
    assert_holds_build(tmp_path / "out", [new_input], "shard", {})
    assert_recovered(tmp_path, left, caplog)


@pytest.mark.timeout(60)
def test_the_next_run_recovers_before_it_builds_even_when_its_build_fails(
    tmp_path: Path, shard_builds: dict, caplog: pytest.LogCaptureFixture
) -> None:
    kill_at = expected_steps("renames", MAKE_SHARDS_CARRIED).index("rename .out.ready out")
    killed = run_publisher_process({**shard_builds["job"], "swap": "renames", "kill_at": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert assert_old_or_new(tmp_path, shard_builds["builds"], "shard", shard_builds["user_files"]) == "ready"

    broken = tmp_path / "truncated.jsonl.zst"
    frame = zstandard.ZstdCompressor().compress(Path(shard_builds["job"]["inputs"][0]).read_bytes())
    broken.write_bytes(frame[: len(frame) // 2])
    with caplog.at_level(logging.INFO), pytest.raises(ShardInputError):
        make_shards([str(broken)], tmp_path / "out")
    assert_holds_build(tmp_path / "out", shard_builds["builds"]["new"], "shard", shard_builds["user_files"])
    assert_recovered(tmp_path, [".out.ready"], caplog)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("swap, killed_step", [("exchange", "exchange .out.partial-* out"),
                                               ("renames", "rename .out.ready out")])
def test_annotate_shards_killed_while_publishing(
    tmp_path: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    swap: str, killed_step: str
) -> None:
    skip_without_exchange(swap, tmp_path)
    monkeypatch.setattr(annotate_module, "build_annotator", no_annotator)
    make_shards([write_jsonl(tmp_path / "old.jsonl", OLD_TEXTS)], tmp_path / "raw-old", docs_per_shard=2)
    make_shards([write_jsonl(tmp_path / "new.jsonl", NEW_TEXTS)], tmp_path / "raw-new", docs_per_shard=1)
    builds = {"old": expand_shard_spec(str(tmp_path / "raw-old")), "new": expand_shard_spec(str(tmp_path / "raw-new"))}
    annotate_module.annotate_shards(builds["old"], tmp_path / "out", tokenizer_path)
    user_files = add_user_files(tmp_path / "out", ["notes.txt"])

    kill_at = expected_steps(swap, ["notes.txt"]).index(killed_step)
    killed = run_publisher_process({"command": "annotate", "root": str(tmp_path), "inputs": builds["new"],
                                    "out": str(tmp_path / "out"), "tokenizer": tokenizer_path, "swap": swap,
                                    "kill_at": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert assert_old_or_new(tmp_path, builds, "annotated", user_files) == {"exchange": "old", "renames": "ready"}[swap]
    left = left_beside_out(tmp_path)

    with caplog.at_level(logging.INFO):
        annotate_module.annotate_shards(builds["new"], tmp_path / "out", tokenizer_path)
    manifest = assert_holds_build(tmp_path / "out", builds["new"], "annotated", user_files)
    assert manifest["documents"] == len(NEW_TEXTS)
    assert_recovered(tmp_path, left, caplog)


if __name__ == "__main__":
    run_publisher(json.loads(sys.argv[1]))
