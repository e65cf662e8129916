"""Every document the code and the docs cite is in the repository: a mention of a ``*.md`` file must name a file
of this repository (relative to the root or to the citing file), a ``§N`` after a docs/ file must be a section
heading of it, and a note cited by name ("METHODS §1.2") must exist as a file. References into other projects
name their repository first ("google/prompt-to-prompt README.md") and are not checked."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "controls", "inversion", "editing", "weights_convert", "tests", "docs", ".ci")
SUFFIXES = {".py", ".md", ".toml", ".txt", ".yaml", ".yml", ".cfg"}

MD_FILE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
EXTERNAL = re.compile(r"(?:[\w.-]+/[\w.-]+)[ :]*$|https?://\S*$")  # "owner/repo " or a URL just before
SECTIONS = re.compile(r"(docs/[\w/.-]+\.md)((?:[ ,–-]*(?:and\s+)?§\s?\d+(?:\.\d+)*(?:\s+(?:item|step|pitfall)\s+\d+)?)+)")
NOTES = "METHODS|CHECKPOINTS|PERFORMANCE|STYLE|SCHEDULERS|SDXL|EVALUATION"  # notes kept outside the repository
NAMED_NOTE = re.compile(rf"\b({NOTES})(?:\.md)?\s*§")


WRITTEN = {"report.md"}  # files editlab writes (editlab eval --report), named as outputs, not cited as documents


def text_files() -> list[Path]:
    files = [p for p in ROOT.glob("*") if p.is_file() and p.suffix in SUFFIXES]
    for package in PACKAGES:
        files += [p for p in (ROOT / package).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return sorted(p for p in files if p != Path(__file__).resolve())  # this file's examples are broken on purpose


def headings(doc: Path) -> set[str]:
    """Section numbers of a Markdown file's headings ("## 6.2 Training" -> "6.2")."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#+\s+(\d+(?:\.\d+)*)[.\s]", line + " ")
        if m:
            found.add(m.group(1))
    return found


def problems(path: Path, text: str) -> list[str]:
    out = []
    where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    flat = re.sub(r"\s*\n\s*", " ", text)  # a citation may wrap ("docs/methods.md\n§1.6")
    for m in MD_FILE.finditer(flat):
        name = m.group(1)
        if EXTERNAL.search(flat[max(0, m.start() - 80):m.start()]) or Path(name).name in WRITTEN:
            continue
        if not ((ROOT / name).is_file() or (path.parent / name).is_file()):
            out.append(f"{where}: cites {name}, which is not a file of this repository")
    for m in SECTIONS.finditer(flat):
        doc = ROOT / m.group(1)
        if not doc.is_file():
            continue  # reported above
        have = headings(doc)
        for number in re.findall(r"§\s?(\d+(?:\.\d+)*)", m.group(2)):
            if number not in have:
                out.append(f"{where}: cites {m.group(1)} §{number}, which has no such section")
    for m in NAMED_NOTE.finditer(flat):
        if not any((ROOT / f"{m.group(1)}{suffix}").is_file() for suffix in (".md", "")):
            out.append(f"{where}: cites {m.group(1)} {flat[m.end() - 1:m.end() + 6]!r}, a document not in this "
                       "repository")
    return out


def test_the_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in text_files()}
    assert {"README.md", "docs/methods.md", "docs/checkpoints.md", "ldm/unet.py", "tests/test_layers.py"} <= names


def test_every_cited_document_and_section_is_in_the_repository():
    found = [p for path in text_files() for p in problems(path, path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("text, bad", [
    ("formula (METHODS.md §1.6.3)", True),
    ("grid (METHODS §0.2)", True),
    ("see SCHEDULERS.md", True),
    ("the layout (CHECKPOINTS.md)", True),
    ("cost (docs/performance.md §9)", True),  # the file exists, the section does not
    ("cost (docs/nowhere.md)", True),
    ("wrapped (docs/methods.md\n§6.2 and §99)", True),
    ("conventions (docs/methods.md §0.2-0.3, §1.6 item 3)", False),
    ("wrapped (docs/methods.md\n§6.2)", False),
    ("see BENCHMARKS.md and README.md", False),
    ("code: lllyasviel/ControlNet docs/train.md", False),  # another project's file, named by its repository
    ("the paper's §3.2 (LDM §3.1)", False),
])
def test_the_check_sees_a_missing_reference(text, bad):
    assert bool(problems(ROOT / "editing" / "x.py", text)) == bad
