"""Opening one shard URL as a stream of tar bytes: local files, ``file:`` and ``http(s)://`` URLs (resumable, with
retries, a per-read timeout and a per-request deadline), ``pipe:COMMAND`` sources, zstd decompressed on the fly.

Errors:

* ``open_shard`` raises ``ShardOpenError`` when the shard cannot be opened at all (nothing was read), and
  its subclass ``HostUnreachableError`` without trying when the shard's host is considered down: after
  ``host_failure_limit`` shards in a row on one host could not connect (each after its retries), the
  host's remaining shards fail at once for ``HOST_RETRY_AFTER_S`` seconds, then one shard tries again.
  An http request that waits longer than ``deadline_s`` for the server in all is cut off and counts as a
  timeout (retried, then ``ShardOpenError``); ``PipeNotAllowedError`` for a ``pipe:`` source without
  ``allow_pipe``, and ``ShardOpenError`` for an unsupported URL scheme.
* Reading the returned stream raises ``TruncatedStreamError`` when the shard ends early: a zstd stream that
  ends inside a frame, an http body that stays short after the allowed resumes, a pipe command that exits
  with a non-zero status. Corrupt zstd data is reported the same way: the bytes delivered before the error
  are good, nothing after them can be read. A body still arriving when its request's ``deadline_s`` has
  passed (a server trickling bytes) is resumed like a dropped one.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, cast
from urllib.parse import urlsplit
from urllib.request import pathname2url, url2pathname

import requests
import requests.adapters
import urllib3
import zstandard

from ..config.job_config import DataConfig

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
HTTP_PREFIXES = ("http://", "https://")
FILE_PREFIX = "file:"
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_ZSTD_SUFFIXES = (".zst", ".zstd")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
# 408 and 429 are the 4xx answers that mean "try again later" rather than "this will never work".
_RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})

HOST_RETRY_AFTER_S = 60.0
"""How long the shards of a host that stopped connecting fail without a try."""

_CHUNK_SIZE = 1 << 17
_BUFFER_SIZE = 1 << 20


@dataclass(frozen=True)
class StreamOptions:
    """How shard URLs are opened; the defaults are the job config's (``DataConfig``)."""

    timeout_s: float = DataConfig.http_timeout_s
    """Connect and read timeout of every http request (each socket read, not the whole download)."""
    deadline_s: float = DataConfig.http_deadline_s
    """How long one http request (the first, a retry or a resume) may wait for the server in all: connecting,
    the answer and every read of its body, not the time the reader spends between reads. A request past it
    is cut off and handled as a timeout: retried or resumed within ``retries``, then the shard fails."""
    retries: int = DataConfig.http_retries
    """Retries after the first attempt on connection errors, timeouts, 5xx, 408 and 429; also how many
    times a dropped http body is resumed."""
    retry_backoff_s: float = 1.0
    """The n-th retry waits ``retry_backoff_s * 2 ** (n - 1)`` seconds."""
    allow_pipe: bool = False
    """Whether ``pipe:COMMAND`` sources, which run shell commands, may be used."""
    host_failure_limit: int = 2
    """After this many shards in a row on one host failed to connect, the host's other shards fail at once."""

    def __post_init__(self) -> None:
        if (
            self.timeout_s <= 0
            or self.deadline_s <= 0
            or self.retries < 0
            or self.retry_backoff_s < 0
            or self.host_failure_limit < 1
        ):
            raise ValueError(
                f"invalid stream options {self}: need timeout_s > 0, deadline_s > 0, retries >= 0, "
                "retry_backoff_s >= 0, host_failure_limit >= 1"
            )


class ShardOpenError(OSError):
    """A shard (or a manifest) cannot be opened: missing file, http 4xx, unreachable after retries,
    ``pipe:`` not allowed, unsupported URL scheme."""


class HostUnreachableError(ShardOpenError):
    """A shard not even tried: its host failed to connect for the last ``host_failure_limit`` shards."""


class PipeNotAllowedError(ShardOpenError):
    """A ``pipe:`` source while ``allow_pipe`` is off; the command line names the flag that allows it."""


class TruncatedStreamError(OSError):
    """A shard stream ended before its real end: truncated or corrupt zstd data, an http body short of its
    Content-Length that could not be resumed, a pipe command with a non-zero exit status."""


def open_shard(url: str, options: StreamOptions = StreamOptions()) -> BinaryIO:
    """Opens one shard URL (as returned by ``expand_shard_spec``) for reading its tar bytes.

    The stream is read-only and never seekable, whatever the source; names ending in ``.zst``/``.zstd``
    are decompressed on the fly, and ``pipe:`` output is decompressed when it starts with the zstd magic
    number (the command text says nothing reliable about its output). Closing the stream releases its
    connection or kills its pipe command; the stream is also a context manager.
    """
    return cast(BinaryIO, _open(url, options))


def _open(url: str, options: StreamOptions) -> io.BufferedReader:
    if url.startswith(PIPE_PREFIX):
        require_pipe_allowed(url, options)
        command_output = _buffered(_PipeOutput(url[len(PIPE_PREFIX) :]))
        return _buffered(_ZstdReader(url, command_output, only_if_zstd=True))
    if url.startswith(HTTP_PREFIXES):
        source = _buffered(_HttpBody(url, options))
        name = urlsplit(url).path
    elif url.startswith(FILE_PREFIX):
        source = _open_local_file(file_url_path(url))
        name = urlsplit(url).path
    else:
        reject_unsupported_scheme(url)
        source = _open_local_file(os.path.expanduser(url))
        name = url
    if name.lower().endswith(_ZSTD_SUFFIXES):
        return _buffered(_ZstdReader(url, source))
    return source


def require_pipe_allowed(url: str, options: StreamOptions) -> None:
    if not options.allow_pipe:
        raise PipeNotAllowedError(
            f"refusing to run shard source {url!r}: pipe: sources run shell commands and are off by default"
        )


def reject_unsupported_scheme(url: str) -> None:
    match = _URL_SCHEME.match(url)
    if match:
        raise ShardOpenError(
            f"cannot open {url!r}: unsupported URL scheme {match.group(1)!r} "
            f"(supported: local paths, file:, http://, https://, pipe:COMMAND)"
        )


def file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ShardOpenError(f"cannot open {url!r}: file: URLs on another host ({parts.netloc}) are not supported")
    return url2pathname(parts.path)


def path_to_file_url(path: str) -> str:
    return ("file://" if os.path.isabs(path) else FILE_PREFIX) + pathname2url(path)


def _buffered(raw: io.RawIOBase) -> io.BufferedReader:
    return io.BufferedReader(raw, buffer_size=_BUFFER_SIZE)


class _UnseekableFile(io.FileIO):
    """A local file that claims not to be seekable, so that local shards behave like streamed ones."""

    def seekable(self) -> bool:
        return False


def _open_local_file(path: str) -> io.BufferedReader:
    try:
        raw = _UnseekableFile(path, "rb")
    except IsADirectoryError as error:
        raise ShardOpenError(f"cannot open shard {path}: it is a directory (expand it with the shard spec)") from error
    except OSError as error:
        raise ShardOpenError(f"cannot open shard {path}: {error.strerror or error}") from error
    return _buffered(raw)


class _ChunkReader(io.RawIOBase):
    """A raw stream over a source that produces bytes chunk by chunk.

    Subclasses implement ``_next_chunk``, which returns the next non-empty chunk or ``b""`` at the end,
    and ``_release``, which frees what the source holds.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending = memoryview(b"")
        self._exhausted = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            if self._exhausted:
                return 0
            chunk = self._next_chunk()
            if not chunk:
                self._exhausted = True
                return 0
            self._pending = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._pending))
        target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()

    def _next_chunk(self) -> bytes:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class _ZstdReader(_ChunkReader):
    """Decompresses a stream of concatenated zstd frames and refuses to end inside a frame.

    ``zstandard``'s ``stream_reader`` ends silently on a truncated frame, hence one ``decompressobj`` per
    frame, whose ``eof`` says whether the frame was complete. With ``only_if_zstd``, input that does not
    start with the zstd magic number is passed through unchanged.
    """

    def __init__(self, url: str, source: io.BufferedReader, only_if_zstd: bool = False) -> None:
        super().__init__()
        self._url = url
        self._source = source
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._frame_has_input = False
        self._check_magic = only_if_zstd
        self._passthrough = False

    def _next_chunk(self) -> bytes:
        while True:
            if self._check_magic:
                self._check_magic = False
                data = self._source.read(len(_ZSTD_MAGIC))
                self._passthrough = bool(data) and data != _ZSTD_MAGIC
            else:
                # read1 does at most one read of the source, so the source's error at its end cannot
                # swallow input that was already read
                data = self._source.read1(_CHUNK_SIZE)
            if self._passthrough:
                return data
            if not data:
                if self._frame_has_input:
                    raise TruncatedStreamError(f"{self._url}: zstd stream ends inside a frame (truncated data)")
                return b""
            output = self._decompress(data)
            if output:
                return output

    def _decompress(self, data: bytes) -> bytes:
        outputs = []
        while data:
            self._frame_has_input = True
            try:
                outputs.append(self._frame.decompress(data))
            except zstandard.ZstdError as error:
                raise TruncatedStreamError(f"{self._url}: corrupt zstd data: {error}") from error
            if not self._frame.eof:
                break
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._frame_has_input = False
        return b"".join(outputs)

    def _release(self) -> None:
        self._source.close()


class _HttpBody(_ChunkReader):
    """The body of an http(s) GET, with retries on opening and resumption when the body breaks off.

    A resumed request asks for ``Range: bytes=N-``; a server that ignores the range answers 200 and its
    first N bytes are skipped. Bytes are counted as sent (``Accept-Encoding: identity``), so that offsets,
    ranges and Content-Length agree; a server that encodes the body anyway is read without resumption.
    """

    def __init__(self, url: str, options: StreamOptions) -> None:
        super().__init__()
        self._url = url
        self._options = options
        self._deadline = _RequestDeadline(options.deadline_s)
        self._session = requests.Session()
        adapter = _SocketReportingAdapter(self._deadline.connected)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._response: requests.Response | None = None
        self._delivered = 0
        self._resumes = 0
        try:
            response = self._get(start=0)
        except BaseException:
            self.close()
            raise
        self._length = _full_length(response)
        self._etag = response.headers.get("ETag")
        self._resumable = response.headers.get("Content-Encoding", "identity").lower() == "identity"
        if not self._resumable:
            self._length = None  # Content-Length counts encoded bytes, the body yields decoded ones
        self._start_body(response, offset=0)

    def _start_body(self, response: requests.Response, offset: int) -> None:
        self._response = response
        self._chunks = response.iter_content(chunk_size=_CHUNK_SIZE)
        self._body_offset = offset

    def _next_chunk(self) -> bytes:
        while True:
            try:
                with self._deadline.waiting():
                    chunk = next(self._chunks, b"")
            except requests.RequestException as error:
                self._resume(self._deadline.cut_off or f"the connection broke ({error})")
                continue
            if self._deadline.cut_off:
                self._resume(self._deadline.cut_off)  # the bytes of this read, if any, are read again
                continue
            if not chunk:
                if self._length is not None and self._body_offset < self._length:
                    self._resume(f"the body ended at byte {self._body_offset} of {self._length}")
                    continue
                return b""
            chunk_start = self._body_offset
            self._body_offset += len(chunk)
            if self._body_offset <= self._delivered:
                continue  # a server that ignored our Range header is re-sending bytes already delivered
            chunk = chunk[self._delivered - chunk_start :]
            self._delivered += len(chunk)
            return chunk

    def _resume(self, reason: str) -> None:
        where = f"{self._url} at byte {self._delivered}" + (f" of {self._length}" if self._length else "")
        if not self._resumable:
            raise TruncatedStreamError(f"{where}: {reason}; the body is content-encoded and cannot be resumed")
        if self._resumes >= self._options.retries:
            raise TruncatedStreamError(f"{where}: {reason}; gave up after {self._resumes} resumes")
        self._resumes += 1
        log.warning("%s: %s; resuming (%d of %d)", where, reason, self._resumes, self._options.retries)
        self._close_response()
        try:
            response = self._get(start=self._delivered)
        except ShardOpenError as error:
            raise TruncatedStreamError(f"{where}: {reason}; resuming failed: {error}") from error
        resumed_in_range = response.status_code == 206
        if resumed_in_range and (range_start := _content_range_start(response)) != self._delivered:
            response.close()
            raise TruncatedStreamError(f"{where}: the server resumed at byte {range_start} instead")
        changed = (self._etag is not None and response.headers.get("ETag") not in (None, self._etag)) or (
            self._length is not None and _full_length(response) not in (None, self._length)
        )
        if changed:
            response.close()
            raise TruncatedStreamError(f"{where}: the file changed on the server while it was being read")
        self._start_body(response, offset=self._delivered if resumed_in_range else 0)

    def _get(self, start: int) -> requests.Response:
        """GETs the URL from byte ``start`` on, retrying connection errors, timeouts and 5xx answers."""
        _HOSTS.check(self._url, self._options)
        headers = {"Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        timeout = (self._options.timeout_s, self._options.timeout_s)
        attempts = self._options.retries + 1
        failure = ""
        reached_host = False
        for attempt in range(attempts):
            if attempt:
                log.warning("%s: attempt %d of %d failed: %s", self._url, attempt, attempts, failure)
                time.sleep(self._options.retry_backoff_s * 2 ** (attempt - 1))
            self._deadline.start_request()
            try:
                with self._deadline.waiting():
                    response = self._session.get(self._url, headers=headers, stream=True, timeout=timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure = self._deadline.cut_off or str(error)
                reached_host = False
                continue
            except requests.RequestException as error:
                raise ShardOpenError(f"cannot open {self._url}: {error}") from error
            if self._deadline.cut_off:
                response.close()
                failure = self._deadline.cut_off
                reached_host = False
                continue
            _HOSTS.connected(self._url)
            reached_host = True
            status = response.status_code
            if status >= 500 or status in _RETRYABLE_CLIENT_ERRORS:
                failure = f"HTTP {status} {response.reason}"
                response.close()
                continue
            if not 200 <= status < 300:
                response.close()
                raise ShardOpenError(f"cannot open {self._url}: HTTP {status} {response.reason}")
            return response
        if not reached_host:
            _HOSTS.failed_to_connect(self._url, self._options)
        raise ShardOpenError(f"cannot open {self._url}: {failure} (gave up after {attempts} attempts)")

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _release(self) -> None:
        self._close_response()
        self._session.close()
        self._deadline.close()


class _RequestDeadline:
    """Cuts off an http request that has waited ``deadline_s`` in all for the server.

    requests' timeouts bound each socket read, so a server that trickles bytes never times out. The
    request's network calls run inside :meth:`waiting`; the time spent there adds up, and a watchdog thread
    shuts the request's socket down when the sum passes ``deadline_s``, which ends the blocked call. The time
    between reads, while the reader works on what it got, does not count.
    """

    def __init__(self, deadline_s: float) -> None:
        self._deadline_s = deadline_s
        self._condition = threading.Condition(threading.Lock())
        self._left_s = deadline_s
        self._waiting_since: float | None = None
        self._socket: socket.socket | None = None
        self._expired = False
        self._closed = False
        self._watchdog_idle = False
        threading.Thread(target=self._watch, name="http-deadline", daemon=True).start()

    @property
    def cut_off(self) -> str | None:
        """Why the current request was cut off; None while it was not."""
        if not self._expired:
            return None
        return f"the request waited {self._deadline_s:g} s for the server in all (deadline_s)"

    def start_request(self) -> None:
        with self._condition:
            self._left_s, self._expired = self._deadline_s, False

    def connected(self, connection_socket: socket.socket) -> None:
        """Takes the socket of each connection the session opens; a request on a kept-alive connection uses
        the last one."""
        with self._condition:
            self._socket = connection_socket
            if self._expired:
                _shut_down(connection_socket)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        with self._condition:
            self._waiting_since = time.monotonic()
            if self._watchdog_idle:
                self._condition.notify()
        try:
            yield
        finally:
            with self._condition:
                self._left_s -= time.monotonic() - self._waiting_since
                self._waiting_since = None

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._waiting_since is None or self._expired:
                    self._watchdog_idle = True
                    self._condition.wait()
                    self._watchdog_idle = False
                    continue
                # A wait that started for an earlier read ends no later than this read's deadline: the time
                # left only shrinks, and a new request starts its clock after the old one's read ended.
                left_s = self._waiting_since + self._left_s - time.monotonic()
                if left_s > 0:
                    self._condition.wait(left_s)
                    continue
                self._expired = True
                if self._socket is not None:
                    _shut_down(self._socket)


def _shut_down(connection_socket: socket.socket) -> None:
    """Ends the socket's blocked reads (closing it from another thread would not wake them)."""
    try:
        # socket.socket's shutdown even for TLS: SSLSocket's would drop its TLS state under the reading thread
        socket.socket.shutdown(connection_socket, socket.SHUT_RDWR)
    except OSError:
        pass  # closed in the meantime


class _SocketReportingAdapter(requests.adapters.HTTPAdapter):
    """Hands the socket of every connection it opens to ``on_connect``: requests offers no other handle on
    a request in progress, and a deadline needs one to cut it off."""

    def __init__(self, on_connect: Callable[[socket.socket], None]) -> None:
        self._on_connect = on_connect  # before the base class makes its pool manager
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._report_sockets(self.poolmanager)

    def proxy_manager_for(self, proxy, **proxy_kwargs) -> urllib3.PoolManager:
        new = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if new:
            self._report_sockets(manager)
        return manager

    def _report_sockets(self, manager: urllib3.PoolManager) -> None:
        on_connect = self._on_connect

        def reporting(pool_class: type) -> type:
            class ReportingConnection(pool_class.ConnectionCls):
                def connect(self) -> None:
                    super().connect()
                    on_connect(self.sock)

            return type(pool_class.__name__, (pool_class,), {"ConnectionCls": ReportingConnection})

        manager.pool_classes_by_scheme = {
            scheme: reporting(pool_class) for scheme, pool_class in manager.pool_classes_by_scheme.items()
        }


class _HostCircuitBreaker:
    """Per host (scheme://host:port) of this process: how many shards in a row failed to connect, and
    since when the host is considered down. After ``HOST_RETRY_AFTER_S`` the next shard is tried again;
    if it fails too, the host is down for another pause."""

    def __init__(self) -> None:
        self._failed_shards: dict[str, int] = {}
        self._down_since: dict[str, float] = {}

    def check(self, url: str, options: StreamOptions) -> None:
        host = _host(url)
        down_since = self._down_since.get(host)
        if down_since is not None and time.monotonic() - down_since < HOST_RETRY_AFTER_S:
            raise HostUnreachableError(
                f"cannot open {url}: {host} failed to connect for {self._failed_shards[host]} shards in a row "
                f"(host_failure_limit {options.host_failure_limit}); not trying it for {HOST_RETRY_AFTER_S:.0f} s"
            )

    def failed_to_connect(self, url: str, options: StreamOptions) -> None:
        host = _host(url)
        self._failed_shards[host] = self._failed_shards.get(host, 0) + 1
        if self._failed_shards[host] >= options.host_failure_limit:
            self._down_since[host] = time.monotonic()

    def connected(self, url: str) -> None:
        host = _host(url)
        self._failed_shards.pop(host, None)
        self._down_since.pop(host, None)


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


_HOSTS = _HostCircuitBreaker()


def _full_length(response: requests.Response) -> int | None:
    """The size of the whole file, from Content-Range for a 206 answer and Content-Length otherwise."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        return int(match.group(2)) if match and match.group(2) != "*" else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _content_range_start(response: requests.Response) -> int | None:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


class _PipeOutput(io.RawIOBase):
    """The standard output of a shell command; a non-zero exit status at the end is an error.

    The command runs in its own process group so that closing the stream kills the whole pipeline,
    not just the shell.
    """

    def __init__(self, command: str) -> None:
        super().__init__()
        self._command = command
        try:
            self._process = subprocess.Popen(
                command, shell=True, stdout=subprocess.PIPE, bufsize=0, start_new_session=True
            )
        except OSError as error:
            super().close()
            raise ShardOpenError(f"cannot run {PIPE_PREFIX}{command}: {error}") from error
        self._stdout = cast(io.FileIO, self._process.stdout)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        size = self._stdout.readinto(buffer)
        if size == 0:
            status = self._process.wait()
            if status != 0:
                how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
                raise TruncatedStreamError(f"{PIPE_PREFIX}{self._command} {how}")
        return size or 0

    def close(self) -> None:
        if not self.closed:
            if self._process.poll() is None:
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._stdout.close()
            self._process.wait()
        super().close()
