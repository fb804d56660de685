"""tutorials/annotate.py: the two-column reading view of the paper files.

Nothing here names a function or counts lines of today's files: expectations come from the files at test time
(copied first, so that an edit during the run cannot race the comparison). The tool is run as a command.

What is prose (left column) and so NOT in the code column -- the definition the tool is held to exactly:
  - a docstring: the first statement of the module, a class or a def (at any depth) when it is a string literal
    on lines of its own (nothing before it on its first line, nothing after it on its last);
  - a comment-only line outside brackets, unless it lies between a decorator and its def/class, sits right below
    a line ending in a comment or below such a line (it continues that comment), or is a #! first line.
Every other non-blank line is code and must be in the <pre class="code"> blocks exactly once, in the file's order
(blank lines and trailing whitespace ignored), trailing comments included. The table of contents is the module
docstring, rendered in <div class="toc">.
"""
import ast
import io
import re
import shutil
import subprocess
import sys
import time
import tokenize
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tutorials" / "annotate.py"
PAPER_FILES = ("gpt.py", "calm.py", "mtp.py", "dispersion.py", "brierlm.py")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background"}

TRICKY = '''"""A module whose map names f, Outer.method, Outer and helper (helper is not defined here)."""
import functools


@functools.lru_cache()
# between the decorator and the def: stays with the function
def f(x):
    """f: returns x, with a*b*c and __init__ in prose."""
    return x  # a trailing comment
    # that continues here


class Outer:
    """A class."""

    # a comment before a method
    @staticmethod
    def method():
        """A method's docstring
        on two lines."""
        y = [
            1,
            # a comment inside brackets stays code
            2,  # two
        ]
        return y

    def short(self): "a docstring sharing its line is code"; return 1


def g():
    def inner():
        """A nested function."""
        return 2
    s = """not a docstring
# not a comment either"""
    return inner, s
'''


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


class Page(HTMLParser):
    """What the tests read from a page: code blocks, the links in the table of contents, ids, URLs, CSS."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.code, self.toc_links, self.ids, self.urls, self.tags, self.css = [], [], set(), [], set(), ""
        self.in_code = self.in_style = False
        self.toc_depth = 0   # > 0 inside <div class="toc">
        self.link = None     # [href, text] of the <a> being read inside the toc
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self.urls += [v for k, v in attrs.items() if k in URL_ATTRS and v]
        if tag == "pre" and "code" in classes:
            self.in_code = True
            self.code.append("")
        elif tag == "style":
            self.in_style = True
        elif tag == "div" and (self.toc_depth or "toc" in classes):
            self.toc_depth += 1
        elif tag == "a" and self.toc_depth:
            self.link = [attrs.get("href", ""), ""]

    def handle_endtag(self, tag):
        if tag == "pre":
            self.in_code = False
        elif tag == "style":
            self.in_style = False
        elif tag == "div" and self.toc_depth:
            self.toc_depth -= 1
        elif tag == "a" and self.link:
            self.toc_links.append(tuple(self.link))
            self.link = None

    def handle_data(self, data):
        if self.in_code:
            self.code[-1] += data
        if self.in_style:
            self.css += data
        if self.link:
            self.link[1] += data

    def code_lines(self):
        return [line.rstrip() for block in self.code for line in block.split("\n") if line.strip()]


def expected_code_lines(text):
    """The file's code lines by the definition in this module's docstring."""
    lines = text.split("\n")
    tree = ast.parse(text)
    prose, header = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, *DEFS)) and node.body and isinstance(node.body[0], ast.Expr):
            e = node.body[0]
            if isinstance(e.value, ast.Constant) and isinstance(e.value.value, str):
                before = lines[e.lineno - 1].encode()[:e.col_offset]
                after = lines[e.end_lineno - 1].encode()[e.end_col_offset:]
                if not before.strip() and not after.strip():
                    prose.update(range(e.lineno, e.end_lineno + 1))
        if isinstance(node, DEFS) and node.decorator_list:
            header.update(range(node.decorator_list[0].lineno, node.lineno))
    depth, continuing = 0, set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            row = tok.start[0]
            if tok.line[:tok.start[1]].strip() or row - 1 in continuing:
                continuing.add(row)
            elif depth == 0 and row not in header and not (row == 1 and tok.string.startswith("#!")):
                prose.add(row)
    return [line.rstrip() for n, line in enumerate(lines, 1) if n not in prose and line.strip()]


def map_names(text):
    """Names in the module docstring that the file defines: a top-level def/class, or Class.member."""
    tree = ast.parse(text)
    defined = set()
    for node in tree.body:
        if isinstance(node, DEFS):
            defined.add(node.name)
        if isinstance(node, ast.ClassDef):
            defined.update(f"{node.name}.{m.name}" for m in node.body if isinstance(m, DEFS))
    doc = ast.get_docstring(tree) or ""
    return {m[0] for m in re.finditer(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", doc)} & defined


def check_toc(html, text):
    """Each name of the map has a link in the toc whose target exists and is that name's def/class."""
    page = Page(html)
    for name in sorted(map_names(text)):
        targets = [href[1:] for href, label in page.toc_links if label == name and href.startswith("#")]
        assert targets, f"no link for {name} in the table of contents"
        for target in targets:
            assert target in page.ids, f"{name} links to #{target}, which is not in the page"
            after = re.sub(r"<[^>]+>", "", html[html.index(f'id="{target}"'):])
            first = re.search(r"\b(?:def|class)\s+(\w+)", after.replace("&nbsp;", " "))
            assert first and first[1] == name.split(".")[-1], f"#{target} is not the definition of {name}"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The paper files, copied, rendered once: {name: (source text, page html)}, and the seconds it took."""
    src = tmp_path_factory.mktemp("papers")
    names = [n for n in PAPER_FILES if (ROOT / n).exists()]
    assert names, "no paper file found"
    for n in names:
        shutil.copy(ROOT / n, src / n)
    out = src / "out"
    t0 = time.time()
    r = run("--out", out, *(src / n for n in names))
    seconds = time.time() - t0
    assert r.returncode == 0, r.stderr
    pages = {n: ((src / n).read_text(encoding="utf-8"), (out / (Path(n).stem + ".html")).read_text(encoding="utf-8"))
             for n in names}
    return pages, seconds


@pytest.mark.parametrize("name", PAPER_FILES)
def test_every_code_line_once_in_order(rendered, name):
    if name not in rendered[0]:
        pytest.skip(f"{name} is gone")
    text, html = rendered[0][name]
    expected = expected_code_lines(text)
    assert expected, "a paper file with no code?"
    assert Page(html).code_lines() == expected


@pytest.mark.parametrize("name", PAPER_FILES)
def test_map_links_to_definitions(rendered, name):
    if name not in rendered[0]:
        pytest.skip(f"{name} is gone")
    text, html = rendered[0][name]
    assert map_names(text), f"the docstring of {name} names nothing it defines"
    check_toc(html, text)


@pytest.mark.parametrize("name", PAPER_FILES)
def test_offline(rendered, name):
    if name not in rendered[0]:
        pytest.skip(f"{name} is gone")
    page = Page(rendered[0][name][1])
    remote = [u for u in page.urls if re.match(r"\s*(https?:)?//", u, re.I)]
    assert not remote, f"external URLs: {remote}"
    assert not page.tags & {"script", "link", "iframe", "img", "object", "embed"}
    assert "@import" not in page.css and "url(" not in page.css
    assert "@media" in page.css, "no media query: the phone layout needs one"


def test_fast(rendered):
    assert rendered[1] < 20, f"annotate.py took {rendered[1]:.1f} s for the paper files"


def test_default_files_and_index(tmp_path):
    r = run("--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert {Path(n).stem + ".html" for n in PAPER_FILES if (ROOT / n).exists()} | {"index.html"} == \
        {p.name for p in tmp_path.glob("*.html")}
    index = Page((tmp_path / "index.html").read_text(encoding="utf-8"))
    assert {Path(n).stem + ".html" for n in PAPER_FILES if (ROOT / n).exists()} <= set(index.urls)


def test_edge_cases(tmp_path):
    """No docstring (empty prose, all code); only comments (no code); decorators, methods, nested defs."""
    files = {"nodoc.py": "import os\n\n\ndef f(x):\n    return x + 1  # one more\n",
             "comments.py": "#!/usr/bin/env python\n# only comments here\n#\n# ---------------- a section\n# a*b\n",
             "tricky.py": TRICKY}
    for n, text in files.items():
        (tmp_path / n).write_text(text)
    out = tmp_path / "out"
    r = run("--out", out, *(tmp_path / n for n in files))
    assert r.returncode == 0, r.stderr
    pages = {n: (out / (Path(n).stem + ".html")).read_text(encoding="utf-8") for n in files}
    for n, text in files.items():
        assert Page(pages[n]).code_lines() == expected_code_lines(text), n
    assert Page(pages["nodoc.py"]).code_lines() == [line for line in files["nodoc.py"].split("\n") if line]
    assert Page(pages["comments.py"]).code_lines() == ["#!/usr/bin/env python"]
    assert "only comments here" in pages["comments.py"] and "a section" in pages["comments.py"]
    assert map_names(TRICKY) == {"f", "Outer", "Outer.method"}
    check_toc(pages["tricky.py"], TRICKY)
    assert "a*b*c and __init__" in pages["tricky.py"], "Markdown emphasis ate the notation"


def bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("print('hello')\n")
    (tmp_path / "blob.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (tmp_path / "broken.py").write_text("def f(:\n    return 1\n")
    (tmp_path / "good.py").write_text('"""Fine."""\nx = 1\n')
    return {"missing": [tmp_path / "missing.py"], "not .py": [tmp_path / "notes.txt"],
            "binary": [tmp_path / "blob.py"], "syntax": [tmp_path / "broken.py"],
            "good then bad": [tmp_path / "good.py", tmp_path / "broken.py"]}


@pytest.mark.parametrize("case", ["missing", "not .py", "binary", "syntax", "good then bad"])
def test_bad_input(tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.html").write_text("kept")
    r = run("--out", out, *bad_inputs(tmp_path)[case])
    assert r.returncode == 2
    assert len(r.stderr.strip().split("\n")) == 1 and r.stderr.startswith("error:"), r.stderr
    assert [p.name for p in out.iterdir()] == ["old.html"]
    assert r.stdout == ""
