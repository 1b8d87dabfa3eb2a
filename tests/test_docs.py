"""The README and the pages under docs/ point at files that exist."""

from __future__ import annotations

import re

from helpers import REPO

PAGES = [REPO / "README.md", REPO / "shards" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_topic_page():
    readme = (REPO / "README.md").read_text()
    unlinked = [page.name for page in sorted((REPO / "docs").glob("*.md")) if f"(docs/{page.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_tour_is_what_the_demo_prints_at_its_end():
    from lacy_stream.cli.training import DEMO_CONFIG, tour_commands
    from lacy_stream.config.job_config import load_job_config

    readme = (REPO / "README.md").read_text()
    tour = readme.split("## A ten-minute tour", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    config = load_job_config(DEMO_CONFIG)
    expected = tour_commands(None, [], config, f"{config.train.run_dir}/hf")
    assert tour[0] == "lacy-stream demo"
    assert [(purpose.removeprefix("# "), command) for purpose, command in zip(tour[1::2], tour[2::2])] == expected


def test_every_view_has_its_screenshot_in_the_docs():
    shown = set()
    for page in (REPO / "docs").glob("*.md"):
        shown |= set(re.findall(r"!\[[^\]]*\]\(views/([\w-]+)\.png\)", page.read_text()))
    assert shown == {"labels", "generations", "report", "comparison"}
    assert {path.stem for path in (REPO / "docs" / "views").glob("*.png")} == shown
