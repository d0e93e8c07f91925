"""The documentation stays true to the repository: every relative link names a file that exists (without an
anchor, which breaks silently when a heading changes), README.md fits on a screen or two, and every `make`
target it names is in the Makefile."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted([README, *glob.glob(os.path.join(ROOT, "docs", "*.md")),
               os.path.join(ROOT, "bench", "README.md"), os.path.join(ROOT, "tests", "README.md")])
MAX_README_LINES = 200
# the pages the README sends a reader to for what it no longer holds
MOVED = ["docs/method.md", "docs/running.md", "docs/distributed.md", "bench/README.md", "tests/README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MARKDOWN_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"`([^`]+)`")
MAKE_COMMAND = re.compile(r"(?:^|[\s;&|(])make((?:\s+[^\s#;&|)]+)+)")
TARGET = re.compile(r"[A-Za-z][\w.-]*")
RULE = re.compile(r"^([^\s#=:][^:=]*?)\s*::?(?!=)")


def split_code(text):
    """(prose lines, code lines): fenced blocks are code; inline code spans are cut out of the prose."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            code.extend(CODE_SPAN.findall(line))
            prose.append(CODE_SPAN.sub("", line))
    return prose, code


def links(text):
    """The targets of Markdown links and images in ``text``, outside code."""
    prose, _ = split_code(text)
    found = []
    for line in prose:
        found += INLINE_LINK.findall(line)
        match = MARKDOWN_REF_LINK.match(line)
        if match:
            found.append(match.group(1))
    return found


def is_external(target):
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) is not None or target.startswith("//")


def make_targets_named(text):
    """Every target of a `make ...` command in code (blocks or spans): `make demo semi-demo` names two."""
    _, code = split_code(text)
    named = set()
    for line in code:
        for match in MAKE_COMMAND.finditer(line):
            for word in match.group(1).split():
                if "=" in word or word.startswith("-"):
                    continue  # a variable or an option, not a target
                if not TARGET.fullmatch(word):
                    break
                named.add(word)
    return named


def makefile_targets(text):
    targets = set()
    for line in text.splitlines():
        if line.startswith("\t"):
            continue  # a recipe line
        match = RULE.match(line)
        if match:
            targets.update(match.group(1).split())
    return targets


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_the_parsers_find_what_they_should_and_skip_code():
    text = ("See [the method](docs/method.md) and ![a figure](fig/a.png \"title\"), not `[x](in/a/span.md)`.\n"
            "[ref]: bench/README.md\n"
            "```\n[in a block](nowhere.md)\nmake demo   # comment\nOMP_NUM_THREADS=1 make demo semi-demo\n```\n"
            "Run `make lint` or `make test TEST_WORKERS=4`; make sure prose is not read.\n"
            "[web](https://example.org/page#part)\n")
    assert links(text) == ["docs/method.md", "fig/a.png", "bench/README.md", "https://example.org/page#part"]
    assert make_targets_named(text) == {"demo", "semi-demo", "lint", "test"}
    assert makefile_targets("A := 1\n.PHONY: x y\nx: a.txt\n\techo x: y\n$(V)/.ok: b\ny z: ; :\n") == \
        {".PHONY", "x", "$(V)/.ok", "y", "z"}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_names_an_existing_file_without_an_anchor(path):
    assert os.path.isfile(path), path
    base = os.path.dirname(path)
    problems = []
    for target in links(read(path)):
        if is_external(target):
            continue
        if "#" in target:
            problems.append(f"{target}: has an anchor")
            continue
        resolved = os.path.normpath(os.path.join(base, target))
        if os.path.commonpath([resolved, ROOT]) != ROOT:
            problems.append(f"{target}: outside the repository")
        elif not os.path.isfile(resolved):
            problems.append(f"{target}: no such file")
    assert problems == []


def test_readme_links_to_every_page_that_holds_what_moved_out_of_it():
    linked = {os.path.normpath(t) for t in links(read(README)) if not is_external(t)}
    assert [page for page in MOVED if os.path.normpath(page) not in linked] == []


def test_readme_fits_on_a_screen_or_two():
    lines = read(README).splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_every_make_target_the_readme_names_is_in_the_makefile():
    named = make_targets_named(read(README))
    assert {"test", "demo"} <= named  # the quick start's commands are found at all
    assert sorted(named - makefile_targets(read(os.path.join(ROOT, "Makefile")))) == []


def test_make_test_lower_pins_every_requirement_at_its_lower_bound():
    """`make test-lower` installs what its sed makes of the requirement files: each requirement of
    requirements.txt (and pytest, pytest-xdist) must be `name>=version`, or it would escape the pins."""
    import shutil
    import subprocess
    if shutil.which("sed") is None:
        pytest.skip("no sed")
    makefile = read(os.path.join(ROOT, "Makefile"))
    script = re.search(r"sed -n '([^']+)' requirements\.txt requirements-dev\.txt", makefile).group(1)
    for name, must_pin in (("requirements.txt", None), ("requirements-dev.txt", {"pytest", "pytest-xdist"})):
        path = os.path.join(ROOT, name)
        pins = subprocess.run(["sed", "-n", script, path], capture_output=True, text=True, check=True).stdout.split()
        wanted = [line.split("#")[0].strip() for line in read(path).splitlines()]
        wanted = [w for w in wanted if w and not w.startswith("-")]
        if must_pin is not None:
            wanted = [w for w in wanted if re.split(r"[<>=!~ ]", w)[0] in must_pin]
            pins = [p for p in pins if p.split("==")[0] in must_pin]
        assert pins == [w.replace(">=", "==") for w in wanted] and all(">=" in w for w in wanted)
