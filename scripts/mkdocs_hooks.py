"""mkdocs hooks: the pages that come from the code, generated at build time so they cannot drift.

- `methods/<name>.md` for every registered method: its description, what it needs, its module's
  docstring (the math in the project's notation, departures from the paper), and its `args` fields with
  their defaults and comments, read from the method's `Config` dataclass and its source.
- The `<!-- needs-table -->` marker (choosing.md) becomes the table of what each method needs.
- The `<!-- matrix -->` marker (status.md) becomes the method x model matrix of tests/test_matrix.py.
- The `<!-- readme -->` marker (index.md) becomes the README, so the front page is the README.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {  # method -> the results page where it is measured
    "ddpo": "digits", "d3po": "digits", "spo": "digits", "tailorpo": "digits", "tailorpo-g": "digits",
    "diffusion-dpo": "digits", "diffusion-kto": "digits", "nabla-gfn": "nabla-gfn", "alignprop": "nabla-gfn",
    "draft": "nabla-gfn", "refl": "nabla-gfn", "dpok": "nabla-gfn", "ddo": "ddo", "ddo-dpo": "ddo", "ddo-kto": "ddo",
    "constrained": "constrained", "grpo": "flow", "nft": "forward", "awm": "forward",
    "adjoint-matching": "adjoint-matching"}


def _methods():
    sys.path.insert(0, str(ROOT / "src"))
    from diffalign.methods import get_method, list_methods

    return [(name, get_method(name)) for name, _ in list_methods()]


def _comments(cls) -> dict:
    """field -> its trailing `# comment` in the Config class's source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=]*=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def config_table(cls) -> str:
    if cls is None or not dataclasses.is_dataclass(cls):
        return "This method has no `args`."
    comments = {}
    for klass in reversed(cls.__mro__):
        comments.update(_comments(klass))
    rows = ["| `args.` field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        text = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default!r}` | {text} |")
    return "\n".join(rows)


def needs(cls) -> list[str]:
    out = []
    if getattr(cls, "requires_logprob", False):
        out.append("log-probabilities (eta > 0)")
    if getattr(cls, "requires_differentiable_reward", False):
        out.append("a differentiable reward")
    if getattr(cls, "offline_data", False):
        out.append("a feedback file (pairs or labels), no reward queries")
    if getattr(cls, "requires_reference", False):
        out.append("the frozen base")
    return out


def method_page(name: str, cls) -> str:
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    need = needs(cls)
    results = RESULTS.get(name)
    return "\n".join([
        f"# `{name}`", "", cls.description, "",
        "**Needs:** " + (", ".join(need) if need else "a reward to query") + ".", "",
        f"**Results:** [{results}](../results/{results}.md)." if results else "", "",
        f"Config: `method: {name}`; the method's own settings go under `args:`.", "",
        "## Config", "", config_table(getattr(cls, "Config", None)), "",
        "## How it works", "", f"From `{cls.__module__}`:", "", "```text", doc, "```", ""])


def needs_table() -> str:
    rows = ["| method | needs | measured in |", "|---|---|---|"]
    for name, cls in _methods():
        results = RESULTS.get(name)
        link = f"[{results}](results/{results}.md)" if results else "–"
        rows.append(f"| [`{name}`](methods/{name}.md) | {', '.join(needs(cls)) or 'a reward to query'} | {link} |")
    return "\n".join(rows)


def on_files(files, config):
    for name, cls in _methods():
        files.append(File.generated(config, f"methods/{name}.md", content=method_page(name, cls)))
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- readme -->" in markdown:  # the front page is the README, its links made relative to docs/
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        markdown = markdown.replace("<!-- readme -->", re.sub(r"\]\(docs/", "](", readme))
    if "<!-- needs-table -->" in markdown:
        markdown = markdown.replace("<!-- needs-table -->", needs_table())
    if "<!-- matrix -->" in markdown:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_matrix import matrix_markdown

        markdown = markdown.replace("<!-- matrix -->", matrix_markdown())
    return markdown
