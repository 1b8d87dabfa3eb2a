"""Shard specs: what users pass as ``--data.shards``, expanded into the shard URLs it names.

Local paths, ``file:`` URLs, ``http(s)://`` URLs and ``pipe:COMMAND`` sources, with brace expansion
(``wiki-{000000..000127}.tar``), several specs joined by ``::`` or given as a list, and shard directories (or
their ``manifest.json``, also over http) that expand to the shards their manifest lists. :mod:`.streams` opens
each URL.

``expand_shard_spec`` raises ``ValueError`` for a malformed spec or manifest and for a shard listed twice,
and ``ShardOpenError`` for what it cannot read or is not allowed to run (a directory without manifest, an
unreachable manifest URL, a ``pipe:`` source without ``allow_pipe``, an unsupported URL scheme) and for a spec
whose every shard is a local path that does not exist (one missing shard among others is a counted skip).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from urllib.parse import quote, urljoin, urlsplit

from braceexpand import UnbalancedBracesError, braceexpand

from .streams import (
    FILE_PREFIX,
    HTTP_PREFIXES,
    PIPE_PREFIX,
    ShardOpenError,
    StreamOptions,
    file_url_path,
    open_shard,
    path_to_file_url,
    reject_unsupported_scheme,
    require_pipe_allowed,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lacy-stream-shards"
MANIFEST_VERSION = 1
_SPEC_SEPARATOR = "::"


def expand_shard_spec(spec: str | Sequence[str], options: StreamOptions = StreamOptions()) -> list[str]:
    """Expands a shard spec into the list of shard URLs, in the order given.

    Plain paths and URLs stay as written (after ``~`` expansion of local paths); shard directories and
    ``manifest.json`` files or URLs become the shards their manifest lists, joined to the manifest's
    location in the same notation. A shard that appears twice (under any spelling that names the same
    file) is an error, since its documents would be read twice.
    """
    urls: list[str] = []
    first_spelling: dict[str, str] = {}
    for pattern in _split_spec(spec):
        try:
            expanded = list(braceexpand(pattern))
        except UnbalancedBracesError as error:
            raise ValueError(f"shard spec {pattern!r}: {error}") from error
        for item in expanded:
            for url in _expand_item(item, options):
                identity = _shard_identity(url)
                if identity in first_spelling:
                    also = "" if first_spelling[identity] == url else f" (also as {first_spelling[identity]!r})"
                    raise ValueError(
                        f"shard {url!r} appears twice in the shard spec{also}; its documents would be read twice"
                    )
                first_spelling[identity] = url
                urls.append(url)
    if all(_is_missing_local_file(url) for url in urls):
        raise ShardOpenError(f"{urls[0]} does not exist" if len(urls) == 1 else
                             f"none of the {len(urls)} shards of {spec} exists (the first: {urls[0]})")
    return urls


def _split_spec(spec: str | Sequence[str]) -> list[str]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    parts = [part.strip() for item in specs for part in item.split(_SPEC_SEPARATOR)]
    if not parts:
        raise ValueError("empty shard spec")
    if not all(parts):
        raise ValueError(f"shard spec {spec!r} has an empty part (check for a stray '::' or an empty entry)")
    return parts


def _expand_item(item: str, options: StreamOptions) -> list[str]:
    if item.startswith(PIPE_PREFIX):
        require_pipe_allowed(item, options)
        return [item]
    if item.startswith(HTTP_PREFIXES):
        if urlsplit(item).path.endswith("/" + MANIFEST_NAME):
            return _expand_http_manifest(item, options)
        return [item]
    if item.startswith(FILE_PREFIX):
        return _expand_local(file_url_path(item), as_written=item, to_url=path_to_file_url)
    reject_unsupported_scheme(item)
    path = os.path.expanduser(item)
    return _expand_local(path, as_written=path, to_url=lambda shard_path: shard_path)


def _expand_local(path: str, as_written: str, to_url: Callable[[str], str]) -> list[str]:
    """Expands a local directory or manifest file into its shards; any other path is a shard itself."""
    if os.path.isdir(path):
        manifest_path = os.path.join(path, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            raise ShardOpenError(
                f"{as_written} is a directory without {MANIFEST_NAME}; shard directories are written by "
                f"`lacy-stream make-shards`, or name the shards with a brace pattern "
                f"(e.g. {os.path.join(path, 'name-{000000..000009}.tar')})"
            )
    elif os.path.basename(path) == MANIFEST_NAME and os.path.isfile(path):
        manifest_path = path
    else:
        return [as_written]
    try:
        with open(manifest_path, "rb") as manifest_file:
            manifest = manifest_file.read()
    except OSError as error:
        raise ShardOpenError(f"cannot read {manifest_path}: {error}") from error
    directory = os.path.dirname(manifest_path)
    return [to_url(os.path.join(directory, name)) for name in _manifest_shard_names(manifest, manifest_path)]


def _expand_http_manifest(manifest_url: str, options: StreamOptions) -> list[str]:
    with open_shard(manifest_url, options) as stream:
        manifest = stream.read()
    return [urljoin(manifest_url, quote(name)) for name in _manifest_shard_names(manifest, manifest_url)]


def _manifest_shard_names(manifest_bytes: bytes, where: str) -> list[str]:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as error:
        raise ValueError(f"{where}: not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f'{where}: not a lacy-stream shard manifest (expected "format": "{MANIFEST_FORMAT}")')
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{where}: manifest version {manifest.get('version')!r} is not supported (expected {MANIFEST_VERSION})"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: the manifest lists no shards")
    names = []
    for entry in shards:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _is_name_inside_directory(name):
            raise ValueError(f"{where}: bad shard entry {entry!r} (need a relative name inside the directory)")
        names.append(name)
    return names


def _is_name_inside_directory(name: str) -> bool:
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in name.split("/")


def _is_missing_local_file(url: str) -> bool:
    if url.startswith(PIPE_PREFIX) or url.startswith(HTTP_PREFIXES):
        return False
    return not os.path.exists(file_url_path(url) if url.startswith(FILE_PREFIX) else os.path.expanduser(url))


def _shard_identity(url: str) -> str:
    """What two spellings of the same shard have in common: the real path of local files, else the URL."""
    if url.startswith(PIPE_PREFIX) or url.startswith(HTTP_PREFIXES):
        return url
    path = file_url_path(url) if url.startswith(FILE_PREFIX) else url
    return FILE_PREFIX + os.path.realpath(path)
