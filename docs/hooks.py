"""mkdocs hooks for kedit's site (mkdocs.yml `hooks:`).

* ``on_files``: the benchmark notes and results (``bench/README.md``, ``bench/results/*``) become
  part of the site at their repository paths, so pages link to ``../bench/results/rome_single.md``
  and the strict build checks those links, without a copy of the results in ``docs/``.
* ``on_page_content``: kedit's docstrings cite objects with Sphinx roles (``:func:`x```), which
  mkdocstrings' Google style prints verbatim; the role is dropped and ``~a.b.C`` shown as ``C``,
  as Sphinx would.
* ``on_env``: README sections are included into several pages (pymdownx.snippets), and their
  in-README links (``#where-data-lives``) point at a heading that now lives on another page.
  Such a link is pointed at the page that has the heading; anchors found on no page still fail
  the strict build (``validation.anchors: warn``).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
BENCH = ["bench/README.md", "bench/results/*"]


def on_files(files: Files, config) -> Files:
    for pattern in BENCH:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and not path.name.endswith(".tmp"):
                files.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT),
                                  dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj|const):(<code>)(?:~[\w.]*\.)?")


def on_page_content(html: str, page, config, files) -> str:
    return SPHINX_ROLE.sub(r"\1", html)


def on_env(env, config, files: Files):
    pages = [f.page for f in files.documentation_pages() if f.page is not None]
    owner: dict[str, list] = {}
    for page in pages:
        for anchor in page.present_anchor_ids or ():
            owner.setdefault(anchor, []).append(page)
    for page in pages:
        own = page.links_to_anchors.get(page.file, {}) if page.links_to_anchors else {}
        for anchor in list(own):
            if anchor in (page.present_anchor_ids or ()) or len(owner.get(anchor, [])) != 1:
                continue  # on this page, or on no page / several pages: left for the validation
            target = owner[anchor][0].file.url_relative_to(page.file)
            page.content = page.content.replace(f'href="#{anchor}"', f'href="{target}#{anchor}"')
            del own[anchor]
    return env
