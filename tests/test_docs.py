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


def test_readme_claims_table_is_generated_from_the_bench_results():
    """The claims table is `python scripts/claims.py`'s output from docs/bench/*/results.json: a rerun
    bench that moves a number makes this fail until the table is regenerated."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "claims.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, f"README.md's claims table is stale: run python scripts/claims.py\n{r.stderr}"


def test_claim_verdicts_follow_the_interval():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from claims import verdict

    assert verdict(0.01, 0.2, 10, higher=True) == "holds"
    assert verdict(0.01, 0.2, 10, higher=False) == "does not hold here"
    assert verdict(-0.01, 0.2, 10, higher=True) == "not decided"
    assert verdict(0.01, 0.2, 3, higher=True) == "holds (n < 5: indicative)"
    assert verdict(0.091, 0.099, 5, higher=True, level=0.09) == "holds"  # a level: the interval above it
    assert verdict(0.114, 0.141, 5, higher=False, level=0.13) == "not decided"
