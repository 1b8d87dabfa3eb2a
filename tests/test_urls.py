from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import zstandard
from helpers import tar_bytes

from lacy_stream.shards.documents import ReadStats
from lacy_stream.shards.shard_reader import read_shard
from lacy_stream.shards.specs import expand_shard_spec
from lacy_stream.shards.streams import (
    PipeNotAllowedError,
    ShardOpenError,
    StreamOptions,
    TruncatedStreamError,
    open_shard,
)

pytestmark = pytest.mark.timeout(60)

FAST = StreamOptions(timeout_s=2.0, retries=3, retry_backoff_s=0.01)
PIPES = StreamOptions(allow_pipe=True)


def shard_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic, not too compressible bytes standing in for a tar shard."""
    return b"".join(f"{seed}:{i:08d}|".encode() for i in range(size // 12 + 1))[:size]


def read_all(url: str, options: StreamOptions = FAST) -> bytes:
    with open_shard(url, options) as stream:
        return stream.read()


def write_manifest(directory: Path, names: list[str]) -> None:
    shards = [{"name": name, "documents": 1, "bytes": 0, "sha256": "0" * 64} for name in names]
    manifest = {"format": "lacy-stream-shards", "version": 1, "shards": shards}
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --- a loopback http server with scripted misbehaviour ---------------------------------------------------


@dataclass
class ServerScript:
    files: dict[str, bytes] = field(default_factory=dict)
    errors_500: dict[str, int] = field(default_factory=dict)
    """path -> how many requests to answer with 500 before serving the file"""
    drops: dict[str, list[int]] = field(default_factory=dict)
    """path -> for each of the next requests, the number of body bytes sent before dropping the connection"""
    stalls: dict[str, int] = field(default_factory=dict)
    """path -> send this many body bytes, then stall once (longer than the client's timeout)"""
    trickles: dict[str, float] = field(default_factory=dict)
    """path -> send the body one byte per this many seconds (each read gets data within the client's timeout)"""
    header_trickles: dict[str, float] = field(default_factory=dict)
    """path -> send the status line and headers one byte per this many seconds"""
    honor_range: bool = True
    etag_changes: bool = False
    """whether every answer carries a new ETag, as if the file were rewritten between requests"""
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_GET(self) -> None:
        script = self.server.script
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        script.requests.append((path, range_header))
        if script.errors_500.get(path, 0) > 0:
            script.errors_500[path] -= 1
            self.send_error(500)
            return
        body = script.files.get(path)
        if body is None:
            self.send_error(404)
            return
        if path in script.header_trickles:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            self.trickle(head + body, script.header_trickles[path])
            return
        start = 0
        if range_header and script.honor_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", f'"v{len(script.requests) if script.etag_changes else 1}"')
        self.end_headers()
        payload = body[start:]
        try:
            if script.drops.get(path):
                self.wfile.write(payload[: script.drops[path].pop(0)])
                self.close_connection = True
                return
            if path in script.trickles:
                self.trickle(payload, script.trickles[path])
                return
            if path in script.stalls:
                self.wfile.write(payload[: script.stalls[path]])
                self.wfile.flush()
                payload = payload[script.stalls.pop(path) :]
                time.sleep(1.0)
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def trickle(self, data: bytes, interval_s: float) -> None:
        """Sends ``data`` a byte at a time until it is sent or the client has gone."""
        self.close_connection = True
        try:
            for position in range(len(data)):
                self.wfile.write(data[position : position + 1])
                self.wfile.flush()
                time.sleep(interval_s)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


class ScriptedServer(ThreadingHTTPServer):
    def __init__(self, script: ServerScript) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = script


@dataclass
class RunningServer:
    script: ServerScript
    base_url: str

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture
def http_server() -> Iterator[RunningServer]:
    script = ServerScript()
    server = ScriptedServer(script)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield RunningServer(script, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- expansion ---------------------------------------------------------------------------------------------


def test_brace_expansion_of_paths_and_urls(tmp_path: Path) -> None:
    (tmp_path / "wiki-000001.tar").touch()  # missing shards are skips, unless every one is missing
    assert expand_shard_spec(f"{tmp_path}/wiki-{{000000..000002}}.tar") == [
        f"{tmp_path}/wiki-000000.tar",
        f"{tmp_path}/wiki-000001.tar",
        f"{tmp_path}/wiki-000002.tar",
    ]
    with pytest.raises(ShardOpenError, match="none of the 2 shards"):
        expand_shard_spec(f"{tmp_path}/missing-{{0..1}}.tar")
    assert expand_shard_spec("https://host/wiki-{008..010}.tar.zst") == [
        "https://host/wiki-008.tar.zst",
        "https://host/wiki-009.tar.zst",
        "https://host/wiki-010.tar.zst",
    ]


def test_unbalanced_braces_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="Unbalanced"):
        expand_shard_spec("/data/wiki-{000..003.tar")


def test_joined_specs_keep_order_and_lists_work_alike() -> None:
    joined = expand_shard_spec("/b/x-{0..1}.tar::/a/y.tar :: https://h/z.tar")
    assert joined == ["/b/x-0.tar", "/b/x-1.tar", "/a/y.tar", "https://h/z.tar"]
    assert expand_shard_spec(["/b/x-{0..1}.tar", "/a/y.tar::https://h/z.tar"]) == joined


def test_duplicates_are_an_error_under_any_spelling(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twice"):
        expand_shard_spec("/data/a-{0..2}.tar::/data/a-1.tar")
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x")
    with pytest.raises(ValueError, match="twice"):
        expand_shard_spec([str(shard), shard.as_uri()])


def test_empty_specs_are_an_error() -> None:
    specs: list[str | list[str]] = ["", "a.tar::", []]
    for spec in specs:
        with pytest.raises(ValueError, match="empty"):
            expand_shard_spec(spec)


def test_directory_expands_to_manifest_shards_in_manifest_order(tmp_path: Path) -> None:
    names = ["wiki-000001.tar", "wiki-000000.tar.zst", "sub/wiki-000002.tar"]
    write_manifest(tmp_path, names)
    (tmp_path / names[0]).touch()
    expected = [os.path.join(str(tmp_path), name) for name in names]
    assert expand_shard_spec(str(tmp_path)) == expected
    assert expand_shard_spec(str(tmp_path / "manifest.json")) == expected
    assert expand_shard_spec(tmp_path.as_uri()) == [(tmp_path / name).as_uri() for name in names]


def test_directory_without_manifest_points_to_make_shards(tmp_path: Path) -> None:
    (tmp_path / "wiki-000000.tar").write_bytes(b"x")
    with pytest.raises(ShardOpenError, match="make-shards"):
        expand_shard_spec(str(tmp_path))


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": "something-else", "version": 1, "shards": [{"name": "a.tar"}]},
        {"format": "lacy-stream-shards", "version": 2, "shards": [{"name": "a.tar"}]},
        {"format": "lacy-stream-shards", "version": 1, "shards": []},
        {"format": "lacy-stream-shards", "version": 1, "shards": [{"name": "../escape.tar"}]},
        {"format": "lacy-stream-shards", "version": 1, "shards": [{"name": "/abs.tar"}]},
    ],
)
def test_bad_manifests_are_rejected(tmp_path: Path, manifest: dict) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError):
        expand_shard_spec(str(tmp_path))


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ShardOpenError, match="s3"):
        expand_shard_spec("s3://bucket/a.tar")
    with pytest.raises(ShardOpenError, match="s3"):
        open_shard("s3://bucket/a.tar")


def test_http_manifest_expands_relative_to_the_manifest(http_server: RunningServer) -> None:
    manifest = {"format": "lacy-stream-shards", "version": 1, "shards": [{"name": "b.tar"}, {"name": "a b.tar"}]}
    http_server.script.files["/d/manifest.json"] = json.dumps(manifest).encode()
    assert expand_shard_spec(http_server.url("/d/manifest.json"), FAST) == [
        http_server.url("/d/b.tar"),
        http_server.url("/d/a%20b.tar"),
    ]


def test_missing_http_manifest_is_an_open_error(http_server: RunningServer) -> None:
    with pytest.raises(ShardOpenError, match="404"):
        expand_shard_spec(http_server.url("/d/manifest.json"), FAST)


# --- local files ---------------------------------------------------------------------------------------------


def test_local_paths_and_file_urls(tmp_path: Path) -> None:
    data = shard_bytes(3_000_000)
    shard = tmp_path / "with space.tar"
    shard.write_bytes(data)
    assert read_all(str(shard)) == data
    assert read_all(shard.as_uri()) == data
    with open_shard(str(shard)) as stream:
        assert stream.readable() and not stream.seekable()


def test_missing_file_and_directory_are_open_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardOpenError, match="missing.tar"):
        open_shard(str(tmp_path / "missing.tar"))
    with pytest.raises(ShardOpenError, match="directory"):
        open_shard(str(tmp_path))


# --- zstd ----------------------------------------------------------------------------------------------------


def multi_frame_zstd(data: bytes, frames: int) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3)
    step = len(data) // frames + 1
    return b"".join(compressor.compress(data[i : i + step]) for i in range(0, len(data), step))


def test_multi_frame_zstd_is_decompressed(tmp_path: Path) -> None:
    data = shard_bytes(2_000_000, seed=1)
    for suffix in (".tar.zst", ".tar.zstd"):
        shard = tmp_path / f"shard{suffix}"
        shard.write_bytes(multi_frame_zstd(data, frames=5))
        assert read_all(str(shard)) == data


def test_truncated_zstd_raises(tmp_path: Path) -> None:
    compressed = multi_frame_zstd(shard_bytes(500_000, seed=2), frames=2)
    shard = tmp_path / "shard.tar.zst"
    shard.write_bytes(compressed[: len(compressed) * 3 // 4])
    with pytest.raises(TruncatedStreamError, match="inside a frame"):
        read_all(str(shard))


def test_corrupt_zstd_raises(tmp_path: Path) -> None:
    # Damage inside a frame is only detectable with the frame's checksum (the zstd CLI writes one).
    checksummed = zstandard.ZstdCompressor(level=3, write_checksum=True)
    compressed = bytearray(checksummed.compress(shard_bytes(500_000, seed=3)))
    compressed[100:200] = b"\xff" * 100
    shard = tmp_path / "shard.tar.zst"
    shard.write_bytes(bytes(compressed))
    with pytest.raises(TruncatedStreamError, match="corrupt"):
        read_all(str(shard))
    shard.write_bytes(b"this is not zstd at all")
    with pytest.raises(TruncatedStreamError, match="corrupt"):
        read_all(str(shard))


# --- http ----------------------------------------------------------------------------------------------------


def test_http_full_download(http_server: RunningServer) -> None:
    data = shard_bytes(1_500_000)
    http_server.script.files["/s/a.tar"] = data
    assert read_all(http_server.url("/s/a.tar")) == data
    assert http_server.script.requests == [("/s/a.tar", None)]


def test_http_resumes_with_range_after_a_drop(http_server: RunningServer) -> None:
    data = shard_bytes(1_000_000)
    http_server.script.files["/s/a.tar"] = data
    http_server.script.drops["/s/a.tar"] = [300_001, 250_000]
    assert read_all(http_server.url("/s/a.tar")) == data
    ranges = [range_header for _, range_header in http_server.script.requests]
    assert ranges[0] is None and len(ranges) == 3
    # a resume starts at the bytes already delivered, at most what the server sent before the drop
    first_resume, second_resume = (int(str(header).removeprefix("bytes=").rstrip("-")) for header in ranges[1:])
    assert 0 < first_resume <= 300_001 < second_resume <= first_resume + 250_000


def test_http_resume_skips_ahead_when_the_server_ignores_range(http_server: RunningServer) -> None:
    data = shard_bytes(1_000_000)
    http_server.script.files["/s/a.tar"] = data
    http_server.script.drops["/s/a.tar"] = [123_457]
    http_server.script.honor_range = False
    assert read_all(http_server.url("/s/a.tar")) == data


def test_http_resumes_after_a_stall(http_server: RunningServer) -> None:
    data = shard_bytes(500_000)
    http_server.script.files["/s/a.tar"] = data
    http_server.script.stalls["/s/a.tar"] = 200_000
    options = StreamOptions(timeout_s=0.3, retries=2, retry_backoff_s=0.01)
    assert read_all(http_server.url("/s/a.tar"), options) == data
    assert len(http_server.script.requests) == 2
    assert str(http_server.script.requests[1][1]).startswith("bytes=")


def test_http_resume_refuses_a_changed_file(http_server: RunningServer) -> None:
    http_server.script.files["/s/a.tar"] = shard_bytes(1_000_000)
    http_server.script.drops["/s/a.tar"] = [400_000]
    http_server.script.etag_changes = True
    with open_shard(http_server.url("/s/a.tar"), FAST) as stream, pytest.raises(TruncatedStreamError, match="changed"):
        stream.read()


def test_http_too_many_drops_is_truncation(http_server: RunningServer) -> None:
    http_server.script.files["/s/a.tar"] = shard_bytes(1_000_000)
    http_server.script.drops["/s/a.tar"] = [100_000] * 4
    options = StreamOptions(timeout_s=2.0, retries=2, retry_backoff_s=0.01)
    with (
        open_shard(http_server.url("/s/a.tar"), options) as stream,
        pytest.raises(TruncatedStreamError, match="gave up after 2 resumes"),
    ):
        stream.read()


def test_http_zstd_resumes_inside_a_frame(http_server: RunningServer) -> None:
    data = shard_bytes(2_000_000, seed=4)
    compressed = multi_frame_zstd(data, frames=3)
    http_server.script.files["/s/a.tar.zst"] = compressed
    http_server.script.drops["/s/a.tar.zst"] = [len(compressed) // 2]
    assert read_all(http_server.url("/s/a.tar.zst")) == data


def test_http_retries_500s(http_server: RunningServer) -> None:
    data = shard_bytes(10_000)
    http_server.script.files["/s/a.tar"] = data
    http_server.script.errors_500["/s/a.tar"] = 3
    assert read_all(http_server.url("/s/a.tar")) == data
    assert len(http_server.script.requests) == 4


def test_http_gives_up_after_retries_of_500s(http_server: RunningServer) -> None:
    http_server.script.files["/s/a.tar"] = b"x"
    http_server.script.errors_500["/s/a.tar"] = 10
    with pytest.raises(ShardOpenError, match="500"):
        open_shard(http_server.url("/s/a.tar"), FAST)
    assert len(http_server.script.requests) == FAST.retries + 1


def test_http_404_fails_at_once(http_server: RunningServer) -> None:
    slow_retries = StreamOptions(timeout_s=2.0, retries=5, retry_backoff_s=10.0)
    started = time.monotonic()
    with pytest.raises(ShardOpenError, match="404"):
        open_shard(http_server.url("/s/missing.tar"), slow_retries)
    assert time.monotonic() - started < 2.0
    assert len(http_server.script.requests) == 1


def test_http_unreachable_port_fails_after_retries() -> None:
    options = StreamOptions(timeout_s=1.0, retries=2, retry_backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(ShardOpenError, match="3 attempts"):
        open_shard(f"http://127.0.0.1:{unused_port()}/a.tar", options)
    assert time.monotonic() - started < 5.0


def test_http_silent_server_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are accepted by the kernel, but nobody ever answers
        options = StreamOptions(timeout_s=0.2, retries=1, retry_backoff_s=0.01)
        started = time.monotonic()
        with pytest.raises(ShardOpenError, match="2 attempts"):
            open_shard(f"http://127.0.0.1:{silent.getsockname()[1]}/a.tar", options)
        assert time.monotonic() - started < 5.0


@pytest.mark.slow
def test_http_trickling_body_is_cut_off_at_the_deadline_then_the_shard_is_a_counted_skip(
    http_server: RunningServer,
) -> None:
    http_server.script.files["/s/a.tar"] = tar_bytes([(f"{i:03d}", {"txt": b"a document"}) for i in range(3)])
    http_server.script.trickles["/s/a.tar"] = 0.2  # a byte well within every read's timeout, forever
    options = StreamOptions(timeout_s=2.0, deadline_s=1.0, retries=1, retry_backoff_s=0.01)
    stats = ReadStats()
    started = time.monotonic()
    assert list(read_shard(http_server.url("/s/a.tar"), 0, stats, options=options)) == []
    assert 2.0 <= time.monotonic() - started < 4.0, "two requests (the first and one resume), each cut at 1 s"
    assert stats.skipped == {"truncated_stream": 1}
    assert len(http_server.script.requests) == 2


@pytest.mark.slow
def test_http_trickling_body_without_retries_fails_after_one_deadline(http_server: RunningServer) -> None:
    http_server.script.files["/s/a.tar"] = shard_bytes(1000)
    http_server.script.trickles["/s/a.tar"] = 0.2
    options = StreamOptions(timeout_s=2.0, deadline_s=1.0, retries=0)
    started = time.monotonic()
    with (
        open_shard(http_server.url("/s/a.tar"), options) as stream,
        pytest.raises(TruncatedStreamError, match=r"waited 1 s for the server in all \(deadline_s\); gave up"),
    ):
        stream.read()
    assert time.monotonic() - started < 2.0


@pytest.mark.slow
def test_http_trickling_headers_are_cut_off_at_the_deadline(http_server: RunningServer) -> None:
    http_server.script.files["/s/a.tar"] = shard_bytes(1000)
    http_server.script.header_trickles["/s/a.tar"] = 0.1
    options = StreamOptions(timeout_s=2.0, deadline_s=0.5, retries=1, retry_backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(ShardOpenError, match=r"\(deadline_s\) \(gave up after 2 attempts\)"):
        open_shard(http_server.url("/s/a.tar"), options)
    assert time.monotonic() - started < 2.0


@pytest.mark.slow
def test_http_deadline_counts_waiting_for_the_server_not_the_reader(http_server: RunningServer) -> None:
    data = shard_bytes(2_000_000)
    http_server.script.files["/s/a.tar"] = data
    options = StreamOptions(timeout_s=2.0, deadline_s=0.5, retries=0)
    pieces = []
    with open_shard(http_server.url("/s/a.tar"), options) as stream:
        while piece := stream.read(100_000):
            pieces.append(piece)
            time.sleep(0.05)  # a slow reader: 1 s in all, twice the deadline
    assert b"".join(pieces) == data
    assert len(http_server.script.requests) == 1


# --- pipes ---------------------------------------------------------------------------------------------------


def test_pipe_is_refused_by_default(tmp_path: Path) -> None:
    url = f"pipe:cat {tmp_path / 'a.tar'}"
    with pytest.raises(PipeNotAllowedError, match="off by default"):
        expand_shard_spec(url)
    with pytest.raises(PipeNotAllowedError, match="off by default"):
        open_shard(url)


def test_pipe_reads_command_output_when_allowed(tmp_path: Path) -> None:
    data = shard_bytes(300_000)
    (tmp_path / "a.tar").write_bytes(data)
    url = f"pipe:cat {tmp_path / 'a.tar'}"
    assert expand_shard_spec(url, PIPES) == [url]
    assert read_all(url, PIPES) == data


def test_pipe_output_in_zstd_is_decompressed(tmp_path: Path) -> None:
    data = shard_bytes(300_000, seed=5)
    (tmp_path / "a.tar.zst").write_bytes(multi_frame_zstd(data, frames=2))
    assert read_all(f"pipe:cat {tmp_path / 'a.tar.zst'}", PIPES) == data


def test_pipe_non_zero_exit_is_truncation() -> None:
    with open_shard("pipe:printf 'partial'; exit 3", PIPES) as stream:
        assert stream.read(7) == b"partial"
        with pytest.raises(TruncatedStreamError, match="status 3"):
            stream.read()


def test_closing_a_pipe_kills_the_command() -> None:
    with open_shard("pipe:yes | cat", PIPES) as stream:
        assert stream.read(4) == b"y\ny\n"


def live_processes_in_group(group: int) -> list[int]:
    """PIDs in a process group that are still running (zombies left for init to reap don't count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_closing_a_pipe_kills_the_whole_pipeline() -> None:
    stream = open_shard("pipe:echo $$; sleep 30; echo never", PIPES)
    group = int(stream.readline())  # the shell's PID, which leads the command's process group
    assert live_processes_in_group(group)
    stream.close()
    deadline = time.monotonic() + 5.0
    while live_processes_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live_processes_in_group(group)
