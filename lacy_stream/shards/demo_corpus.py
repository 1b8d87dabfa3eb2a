"""The embedded demo corpus: the English Wikipedia excerpt that gensim ships, as plain-text articles.

gensim's test data holds a shortened MediaWiki XML export (bz2) of 106 real articles plus redirects. The
pages are stream-parsed and their wikitext is turned into plain text with mwparserfromhell, laid out like
the paper's dwiki documents: the title, a blank line, then the article, with each section heading as a
line of its own ending in a period.
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from mwparserfromhell.nodes import Node, Tag, Wikilink
    from mwparserfromhell.wikicode import Wikicode

DEMO_FILE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEMO_SOURCE = f"demo:{DEMO_FILE_NAME}"

_INSTALL_HINT = "the demo corpus needs gensim and mwparserfromhell: pip install 'lacy-stream[demo]'"

# Link namespaces that render as an image or a category box rather than as text.
_HIDDEN_LINK_NAMESPACES = frozenset({"file", "image", "category"})
# Interlanguage links ([[de:Foo]]) render in the sidebar, not in the article.
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+)*$")

# Tags whose content is not running prose: citations, tables, images, formulas, code, scores.
_DROPPED_TAGS = frozenset(
    {
        "ref",
        "references",
        "table",
        "gallery",
        "imagemap",
        "timeline",
        "math",
        "chem",
        "ce",
        "score",
        "graph",
        "mapframe",
        "syntaxhighlight",
        "source",
        "pre",
        "templatedata",
        "hr",
    }
)
_LINE_BREAK_TAGS = frozenset({"br"})

# Trailing sections that hold only link lists and citations once templates are gone; any heading that
# mentions references ("Secondary references", "Notes and references") is one of them too.
_BOILERPLATE_SECTIONS = frozenset(
    {"see also", "notes", "footnotes", "citations", "sources", "bibliography", "further reading", "external links"}
)

# Citations, comments, tables, templates and images are cut from the raw wikitext before parsing:
# mwparserfromhell falls back to plain text for a construct it cannot close (an unbalanced '' inside a
# <ref>, a multi-line image caption), which would leave raw markup in the article.
_COMMENT = re.compile(r"<!--.*?(-->|\Z)", re.DOTALL)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.IGNORECASE)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_TEMPLATE_START = re.compile(r"\{\{")
_FILE_LINK_START = re.compile(r"\[\[\s*(file|image)\s*:", re.IGNORECASE)

_BEHAVIOR_SWITCH = re.compile(r"__[A-Z]+__")
# Dropped templates leave "( )" or "(; born 1950)" behind.
_EMPTY_PARENTHESES = re.compile(r"\(\s*\)")
_LEADING_SEPARATOR_IN_PARENTHESES = re.compile(r"\(\s*[,;:]\s*")
# An HTML tag left unclosed in the source (a floating <div> around a table) stays unparsed text.
_STRAY_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
# Unbalanced '' or ''' formatting stays as text; an italic that closes right before "'s" leaves three
# apostrophes inside a word.
_APOSTROPHE_AFTER_FORMATTING = re.compile(r"(?<=\w)'''(?=\w)")
_STRAY_FORMATTING_QUOTES = re.compile(r"'{2,}")
_REPEATED_SPACES = re.compile(r"[ \t]{2,}")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class WikiPage:
    page_id: int
    title: str
    namespace: int
    is_redirect: bool
    wikitext: str


def demo_corpus_path() -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return Path(datapath(DEMO_FILE_NAME))


def iter_wiki_pages(xml_bz2_path: Path) -> Iterator[WikiPage]:
    """Streams the pages of a bz2-compressed MediaWiki XML export, whatever its schema version."""
    with bz2.open(xml_bz2_path, "rb") as stream:
        events = ET.iterparse(stream, events=("start", "end"))
        _, root = next(events)
        for event, element in events:
            if event != "end" or _local_name(element.tag) != "page":
                continue
            yield _page_from_element(element)
            # Finished pages are dropped so that memory stays flat on a full dump.
            root.clear()


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _page_from_element(page: ET.Element) -> WikiPage:
    wikitext = page.findtext("{*}revision/{*}text") or ""
    return WikiPage(
        page_id=int(page.findtext("{*}id") or -1),
        title=page.findtext("{*}title") or "",
        namespace=int(page.findtext("{*}ns") or 0),
        is_redirect=page.find("{*}redirect") is not None or wikitext.lstrip()[:9].upper() == "#REDIRECT",
        wikitext=wikitext,
    )


def wikitext_to_plain(wikitext: str) -> str:
    """Plain article text: templates, tables, references, images, categories and comments dropped,
    link text kept, headings as ``Heading.`` lines, boilerplate trailing sections and empty sections left out.
    """
    try:
        import mwparserfromhell
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error

    sections = []
    for section in mwparserfromhell.parse(_drop_unparsable_markup(wikitext)).get_sections(flat=True, include_lead=True):
        heading, body_nodes = _split_heading(section)
        if heading is not None and _is_boilerplate(heading):
            continue
        body = _clean_text("".join(_node_text(node) for node in body_nodes))
        if not body:
            continue
        sections.append(body if heading is None else f"{_heading_line(heading)}\n{body}")
    return "\n\n".join(sections)


def _drop_unparsable_markup(wikitext: str) -> str:
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING_REF.sub("", text)
    text = _REF.sub("", text)
    text = _drop_tables(text)
    text = _drop_balanced(text, _TEMPLATE_START, "{{", "}}")
    return _drop_balanced(text, _FILE_LINK_START, "[[", "]]")


def _drop_tables(text: str) -> str:
    """Removes ``{| ... |}`` tables, nested ones included; table delimiters only count at a line start."""
    kept = []
    depth = 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            kept.append(line)
    return "\n".join(kept)


def _drop_balanced(text: str, start: re.Pattern[str], opener: str, closer: str) -> str:
    """Removes every span that ``start`` opens, up to the ``closer`` that balances it.

    An unbalanced span loses only its opening token, so that a stray ``{{`` cannot swallow the article.
    """
    tokens = re.compile(f"{re.escape(opener)}|{re.escape(closer)}")
    pieces = []
    position = 0
    while (match := start.search(text, position)) is not None:
        pieces.append(text[position : match.start()])
        end = _balanced_end(text, match.start(), tokens, opener)
        position = end if end is not None else match.start() + len(opener)
    pieces.append(text[position:])
    return "".join(pieces)


def _balanced_end(text: str, begin: int, tokens: re.Pattern[str], opener: str) -> int | None:
    depth = 0
    for token in tokens.finditer(text, begin):
        depth += 1 if token.group() == opener else -1
        if depth == 0:
            return token.end()
    return None


def _split_heading(section: Wikicode) -> tuple[str | None, list[Node]]:
    from mwparserfromhell.nodes import Heading

    nodes = list(section.nodes)
    if nodes and isinstance(nodes[0], Heading):
        title = _clean_text(_code_text(nodes[0].title))
        return title or None, nodes[1:]
    return None, nodes


def _is_boilerplate(heading: str) -> bool:
    lowered = heading.lower()
    return lowered in _BOILERPLATE_SECTIONS or "references" in lowered


def _heading_line(title: str) -> str:
    return title if title[-1] in ".!?" else f"{title}."


def _code_text(code: Wikicode | None) -> str:
    if code is None:
        return ""
    return "".join(_node_text(node) for node in code.nodes)


def _node_text(node: Node) -> str:
    from mwparserfromhell import nodes

    if isinstance(node, nodes.Text):
        return node.value
    if isinstance(node, nodes.HTMLEntity):
        return node.normalize()
    if isinstance(node, nodes.Wikilink):
        return _wikilink_text(node)
    if isinstance(node, nodes.ExternalLink):
        # A bracketed link without a title renders as a footnote number, a bare URL as the URL: neither is prose.
        return _code_text(node.title) if node.title is not None else ""
    if isinstance(node, nodes.Tag):
        return _tag_text(node)
    # Templates, template arguments and comments render no article text.
    return ""


def _wikilink_text(link: Wikilink) -> str:
    target = str(link.title).strip()
    prefix, colon, _ = target.partition(":")
    prefix = prefix.strip().lower()
    if colon and (prefix in _HIDDEN_LINK_NAMESPACES or _LANGUAGE_PREFIX.match(prefix)):
        return ""
    text = _code_text(link.text)
    # A leading colon ([[:Category:X]]) makes a namespaced link an inline one.
    return text if text.strip() else _code_text(link.title).strip().removeprefix(":")


def _tag_text(tag: Tag) -> str:
    name = str(tag.tag).strip().lower()
    if name in _DROPPED_TAGS:
        return ""
    if name in _LINE_BREAK_TAGS:
        return "\n"
    # List markers (*, #, ;, :) parse as contentless li/dt/dd tags; the item text follows them.
    return _code_text(tag.contents)


def _clean_text(text: str) -> str:
    text = _BEHAVIOR_SWITCH.sub("", text)
    text = _STRAY_HTML_TAG.sub("", text)
    text = _APOSTROPHE_AFTER_FORMATTING.sub("'", text)
    text = _STRAY_FORMATTING_QUOTES.sub("", text)
    text = _LEADING_SEPARATOR_IN_PARENTHESES.sub("(", text)
    text = _EMPTY_PARENTHESES.sub("", text)
    text = _REPEATED_SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def iter_demo_documents(xml_bz2_path: Path | None = None) -> Iterator[dict]:
    """Yields ``{"id", "title", "text"}`` for every main-namespace article that is not a redirect.

    ``text`` is the title, a blank line and the plain article; an article whose plain text comes out empty
    is yielded with an empty ``text`` so that the shard builder counts it as a skip rather than losing it.
    """
    path = xml_bz2_path if xml_bz2_path is not None else demo_corpus_path()
    for page in iter_wiki_pages(path):
        if page.namespace != 0 or page.is_redirect:
            continue
        article = wikitext_to_plain(page.wikitext)
        yield {
            "id": page.page_id,
            "title": page.title,
            "text": f"{page.title}\n\n{article}" if article else "",
        }
