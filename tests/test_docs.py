"""What a user reads names papers by their authors, title and arXiv id: the internal numbering of the
project's paper summaries ("seed 000" ... "seed 004") appears nowhere in the README, the package, the
configs or the scripts."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = re.compile(r"\bseeds? 00\d\b", re.IGNORECASE)


def test_no_user_facing_text_calls_a_paper_by_its_internal_number():
    files = [ROOT / "README.md", *(ROOT / "src" / "diffalign").rglob("*.py"), *(ROOT / "configs").rglob("*.yaml"),
             *(ROOT / "scripts").glob("*.py")]
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if INTERNAL.search(line)]
    assert not hits, f"internal paper numbers in user-facing text: {hits}"


def test_the_five_source_papers_are_cited_with_their_arxiv_ids():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for arxiv in ("2502.02954", "2404.04465", "2412.07775", "2502.01667"):
        assert f"arXiv {arxiv}" in readme
    assert "Constrained Diffusion Models via Dual Training" in readme
