"""The READMEs are the front door: every link in them leads somewhere that exists."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "bench/README.md"]


def github_anchor(heading):
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors_of(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_anchor_rule():
    assert github_anchor("Linear + activation: the floor and the autograd floor") == \
        "linear--activation-the-floor-and-the-autograd-floor"
    assert github_anchor("CPU: AMD EPYC, 2 cores (torch 2.14.1)") == "cpu-amd-epyc-2-cores-torch-2141"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    path = REPO / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    assert links, f"{doc} has no links to check"
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors_of(file)):
            broken.append(f"{link}: no heading with that anchor in {file.relative_to(REPO)}")
    assert not broken, f"broken links in {doc}:\n" + "\n".join(broken)


def test_every_training_option_is_in_the_readmes_table():
    """A newcomer finds any option of `fastmlp train` in the README's table of options."""
    import dataclasses

    from fastmlp.train import TrainConfig

    text = (REPO / "README.md").read_text()
    table = text[text.index("| options | what they do |"):]
    table = table[:table.index("\n\n")]
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name.replace('_', '-')}" not in table]
    assert not missing, f"options missing from the README's table: {missing}"
