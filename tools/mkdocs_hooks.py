"""MkDocs hook: the README is the site's home page, its links to docs/ rewritten to the pages beside it."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    readme = (Path(config["config_file_path"]).parent / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", readme)
    files.append(File.generated(config, "index.md", content=text))
    return files
