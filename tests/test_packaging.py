"""What the repository promises about itself: the dependency lists agree (CI installs requirements*.txt, conda
users environment.yml), README.md is a short front door, and every link of it and of docs/ resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?)==([^\s]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_environment_yml_matches_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    req |= _pins((ROOT / "requirements-nodeps.txt").read_text().splitlines())
    env = _pins((ROOT / "environment.yml").read_text().splitlines())
    assert req, "no pins parsed from requirements.txt"
    assert env == req, (
        f"only in requirements: {req.keys() - env.keys()}, only in environment.yml: {env.keys() - req.keys()}, "
        f"differing: {[k for k in req.keys() & env.keys() if req[k] != env[k]]}"
    )
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"


def test_every_requirement_is_pinned_exactly():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert "==" in line, f"unpinned requirement: {line}"


# ------------------------------------------------------------------------------------ README and docs/

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(markdown: str) -> str:
    """A page without its fenced code blocks: a shell command or a heading-like comment there is not prose."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


def _links(markdown: str) -> list[str]:
    """Link targets of a Markdown page, inline (`[text](target)`) and reference-style (`[name]: target`)."""
    prose = _prose(markdown)
    inline = re.findall(r"\]\(([^)\s]+)\)", prose)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.MULTILINE)
    return inline + reference


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(markdown), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _resolves(page: Path, target: str) -> bool:
    """Whether a relative link of ``page`` names a file that exists and, after ``#``, one of its headings."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return False
    return not anchor or file.suffix != ".md" or anchor in _anchors(file.read_text())


def _broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` that do not resolve; links with a scheme (https:, mailto:) point outside."""
    return [t for t in _links(page.read_text()) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not _resolves(page, t)]


def test_every_relative_link_in_readme_and_docs_resolves(tmp_path):
    broken = {str(p.relative_to(ROOT)): b for p in PAGES if (b := _broken_links(p))}
    assert not broken, f"links to files or headings the repository does not have: {broken}"
    # the check itself sees a missing file, a missing heading, and a reference-style link; code blocks are not links
    page = tmp_path / "page.md"
    page.write_text(
        "# A title\n\n[ok](#a-title) [gone](missing.md) [bad](#no-such-heading) [ref][r]\n\n"
        "[r]: also-missing.txt\n\n```\n[not a link](nowhere.md)\n```\n"
    )
    assert _broken_links(page) == ["missing.md", "#no-such-heading", "also-missing.txt"]


def test_readme_points_only_inside_the_repository():
    outside = [t for t in _links((ROOT / "README.md").read_text()) if re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert not outside, f"README.md links outside the repository: {outside}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; reference material belongs in docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_every_module_and_package_is_in_the_readme_package_map():
    readme = (ROOT / "README.md").read_text()
    package = ROOT / "matu_lib"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [f"{d.name}/" for d in package.iterdir() if d.is_dir() and (d / "__init__.py").exists()]
    names += [p.name for p in package.glob("*/*.py") if p.name != "__init__.py"]
    names += ["model_configs/", "flower_app/"]
    missing = [n for n in names if not re.search(rf"(?<![\w/.]){re.escape(n)}", readme)]
    assert not missing, f"not in README.md's package map: {missing}"
