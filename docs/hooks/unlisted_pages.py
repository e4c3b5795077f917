"""MkDocs hook: pages under docs/ that `nav` in mkdocs.yml does not list appear in a "More" section.

Several people add pages in parallel (serve-cluster.md, eval.md, ...); without this they would be built but
reachable only by links or search. Listing a page in `nav` moves it out of "More". The title shown is the
page's first heading, as for any page.
"""

from __future__ import annotations


def on_nav(nav, config, files):  # MkDocs hook
    from mkdocs.structure.nav import Section

    listed = {page.file.src_uri for page in nav.pages}
    extra = sorted(
        (
            f.page
            for f in files.documentation_pages()
            if f.page is not None and f.src_uri not in listed and f.inclusion.is_in_nav()
        ),
        key=lambda page: page.file.src_uri,
    )
    if not extra:
        return nav
    section = Section("More", extra)
    for page in extra:
        page.parent = section
    nav.items.append(section)
    previous = nav.pages[-1] if nav.pages else None
    for page in extra:  # the footer's previous/next links run on through the new pages
        page.previous_page = previous
        if previous is not None:
            previous.next_page = page
        previous = page
    nav.pages.extend(extra)
    return nav
