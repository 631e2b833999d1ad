"""MkDocs hooks: the README is the site's home page, its links to docs/ rewritten to the pages beside it; the LaTeX
of ``$…$`` and ``$$…$$`` (which ``pymdownx.arithmatex`` marks) becomes MathML at build time, which browsers render
without a script or a network connection."""

from __future__ import annotations

import html
import re
from pathlib import Path

from latex2mathml.converter import convert
from mkdocs.structure.files import File

_MATH = re.compile(
    r'<span class="arithmatex">\\\((?P<inline>.*?)\\\)</span>|<div class="arithmatex">\\\[(?P<block>.*?)\\\]</div>',
    re.S,
)


def on_files(files, config):
    readme = (Path(config["config_file_path"]).parent / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", readme)
    files.append(File.generated(config, "index.md", content=text))
    return files


def _mathml(match: re.Match) -> str:
    latex = match.group("inline") if match.group("inline") is not None else match.group("block")
    display = "inline" if match.group("inline") is not None else "block"
    return convert(html.unescape(latex).strip(), display=display)


def on_page_content(content, page, config, files):
    content = _MATH.sub(_mathml, content)
    if 'class="arithmatex"' in content:  # math the pattern above did not take would be shown as raw LaTeX
        raise ValueError(
            f"{page.file.src_path}: math left unconverted near {content[content.index('arithmatex') :][:80]!r}"
        )
    return content
