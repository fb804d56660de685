"""A reading view of the paper files: each one as an HTML page in two columns, the explanation on the left and the
lines that implement it on the right, block by block, to read next to the paper.

    python tutorials/annotate.py [--out DIR] [--screenshots] [FILE.py ...]

writes DIR/<name>.html for each file (default: gpt.py calm.py mtp.py dispersion.py brierlm.py) and DIR/index.html
(default DIR: out/annotated). A page needs nothing from the network: inline CSS, no script, no web font.

What is prose (left column) and what is code (right column), line by line:
  - prose: the docstring of the module, a class or a def (its first statement, a string literal on lines of its
    own) and every comment-only line, except these, which stay code: one inside brackets, one between a decorator
    and its def/class, one right below a line that ends in a comment (it continues that comment), a #! first line;
  - code: every other non-blank line, in the file's order, each exactly once, highlighted by Pygments.
A block is a run of prose and the code below it, up to the next prose; a def or class with a docstring starts a
block at its first decorator, so the docstring sits beside its signature and body. Section comments
(# ------------ the metric) become headings. Prose is Markdown (mistune; emphasis off: the files write a*b and x_i),
except from the first line of a paragraph that is indented or aligned in columns (3+ spaces) to the paragraph's
end, which is kept preformatted so the docstrings' maps and equations keep their alignment. The module docstring
opens the page as its table of contents: every name in it that the file defines (calm_loss, CALM.chunk_inputs)
links to its definition (anchor id = the qualified name). The HTML contract the tests read: the code of each block
in <pre class="code">, the module docstring in <div class="toc">.

--screenshots also takes headless-chromium screenshots of every page at a laptop's width (1366x900) and a phone's
(390x844) into DIR/screenshots/ (skipped, with one line, when chromium is not installed). Bad input (a file that is
missing, not .py, binary, or does not parse) is one line `error: ...` and exit code 2, before anything is written.
"""
import argparse
import ast
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tokenize
from pathlib import Path

try:
    import mistune
except ImportError:  # Jupyter installs it; without it prose is shown as preformatted text
    mistune = None
try:
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    from pygments.token import STANDARD_TYPES
except ImportError:  # likewise: code without colours
    PythonLexer = None

ROOT = Path(__file__).resolve().parent.parent
PAPER_FILES = ("gpt.py", "calm.py", "mtp.py", "dispersion.py", "brierlm.py")
SECTION = re.compile(r"#\s*-{5,}\s*(.*?)\s*")                       # a whole line: # ------------ title
LAID_OUT = re.compile(r"^\s|\S {3,}\S")                              # indented, or columns of text
NAME = re.compile(r"(?<![\w.&#])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")   # calm_loss, CALM.chunk_inputs (not &gt;)
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
SIZES = (("laptop", "1366,900"), ("phone", "390,844"))


class UsageError(Exception):
    """Bad input: one line, exit code 2."""


# ----------------------------------------------------------------------------- reading a file

def read_source(path):
    """The text of a Python file (newlines normalised) and its syntax tree; UsageError when it is not one."""
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    if path.suffix != ".py":
        raise UsageError(f"{path}: not a Python file (expected a .py file)")
    data = path.read_bytes()
    if b"\0" in data:
        raise UsageError(f"{path}: binary file, not Python source")
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as e:
        raise UsageError(f"{path}: not a text file ({e})")
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    try:
        tree = ast.parse(text, filename=str(path))
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except SyntaxError as e:
        raise UsageError(f"{path}: does not parse: line {e.lineno}: {e.msg}")
    except (tokenize.TokenError, ValueError) as e:
        raise UsageError(f"{path}: does not parse: {e}")
    return text, tree, tokens


def docstring(node, lines):
    """The docstring statement of a module, class or def, if it stands on lines of its own, else None."""
    if not node.body or not isinstance(node.body[0], ast.Expr):
        return None
    expr = node.body[0]
    if not isinstance(expr.value, ast.Constant) or not isinstance(expr.value.value, str):
        return None
    before = lines[expr.lineno - 1].encode()[:expr.col_offset]      # ast counts columns in UTF-8 bytes
    after = lines[expr.end_lineno - 1].encode()[expr.end_col_offset:]
    return None if before.strip() or after.strip() else expr


def split_file(text, tree, tokens):
    """Sort the lines of a file into prose and code and group them into blocks (see the module docstring).
    Returns the module docstring (or None), the blocks, and {qualified name: line of its def/class}."""
    lines = text.split("\n")
    doc_lines, docs, anchors, header = set(), {}, {}, set()
    module_doc = docstring(tree, lines)
    if module_doc:
        doc_lines.update(range(module_doc.lineno, module_doc.end_lineno + 1))

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, DEFS):
                visit(child, prefix)
                continue
            name = prefix + child.name
            start = child.decorator_list[0].lineno if child.decorator_list else child.lineno
            header.update(range(start, child.lineno))  # decorators to def: the function's, comments included
            anchors.setdefault(name, start)             # a name defined twice links to the first
            doc = docstring(child, lines)
            if doc:
                doc_lines.update(range(doc.lineno, doc.end_lineno + 1))
                docs[start] = clean_doc(doc.value.value)
            visit(child, name + ".")
    visit(tree, "")

    comments, depth, continued = {}, 0, set()   # comment-only lines that are prose: {line: text after '#'}
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
            depth += 1
        elif tok.type == tokenize.OP and tok.string in (")", "]", "}"):
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            row = tok.start[0]
            if tok.line[:tok.start[1]].strip() or row - 1 in continued:
                continued.add(row)  # a comment after code, or the next line continuing it: code
            elif depth == 0 and row not in header and not (row == 1 and tok.string.startswith("#!")):
                body = tok.string[1:].rstrip()
                comments[row] = body[1:] if body.startswith(" ") else body

    blocks = [dict(heading=None, prose=[], code=[])]
    last_comment = -1
    for n, line in enumerate(lines, 1):
        block = blocks[-1]
        if n in doc_lines:
            continue
        if n in comments:
            section = SECTION.fullmatch(line.strip())
            if section:
                blocks.append(dict(heading=section.group(1), prose=[], code=[]))
                continue
            if block["code"]:
                block = dict(heading=None, prose=[], code=[])
                blocks.append(block)
            if last_comment == n - 1 and block["prose"]:
                block["prose"][-1] += "\n" + comments[n]
            else:
                block["prose"].append(comments[n])
            last_comment = n
        elif line.strip():
            if n in docs:  # a def or class with a docstring: a new block, the docstring beside it
                if block["code"]:
                    block = dict(heading=None, prose=[], code=[])
                    blocks.append(block)
                block["prose"].append(docs[n])
            block["code"].append(n)
        elif block["code"]:
            block["code"].append(n)
    return (clean_doc(module_doc.value.value) if module_doc else None), blocks, anchors


def clean_doc(s):
    """A docstring as the reader sees it: the indentation of its second and later lines removed (PEP 257)."""
    first, _, rest = s.expandtabs().partition("\n")
    return (first.strip() + "\n" + textwrap.dedent(rest)).strip("\n")


# ----------------------------------------------------------------------------- HTML

def esc(s):
    return html.escape(s, quote=False)


def highlight(text):
    """The file's lines as HTML, one string per line (a string spanning lines is cut at each newline)."""
    lines = text.split("\n")
    if PythonLexer is None:
        return [esc(line) for line in lines]
    out, cur = [], []
    for ttype, value in PythonLexer(stripnl=False, ensurenl=False).get_tokens(text):
        while ttype not in STANDARD_TYPES:
            ttype = ttype.parent
        cls = STANDARD_TYPES[ttype]
        for i, piece in enumerate(value.split("\n")):
            if i:
                out.append("".join(cur))
                cur = []
            if piece:
                cur.append(f'<span class="{cls}">{esc(piece)}</span>' if cls else esc(piece))
    out.append("".join(cur))
    return out if len(out) == len(lines) else [esc(line) for line in lines]  # never lose or shift a line


def make_markdown():
    """mistune without emphasis (a*b, x_i and __init__ stay as written) and without links that leave the page."""
    class Renderer(mistune.HTMLRenderer):
        def link(self, text, url, title=None):
            return super().link(text, url) if url.startswith("#") else f"{text} ({esc(url)})"

        def image(self, text, url, title=None):
            return f"[{text}] ({esc(url)})"
    md = mistune.create_markdown(escape=True, renderer=Renderer(escape=True))
    md.inline.rules.remove("emphasis")
    return md


MARKDOWN = make_markdown() if mistune else None


def render_prose(text):
    """Markdown, but from the first laid-out line of a paragraph to its end: preformatted (see LAID_OUT)."""
    if MARKDOWN is None:
        return f"<pre>{esc(text)}</pre>"
    out = []
    for para in re.split(r"\n[ \t]*\n", text.strip("\n")):
        lines = para.split("\n")
        cut = next((i for i, line in enumerate(lines) if LAID_OUT.search(line)), len(lines))
        if cut:
            out.append(MARKDOWN("\n".join(lines[:cut])))
        if cut < len(lines):
            out.append("<pre>" + esc(textwrap.dedent("\n".join(lines[cut:]))) + "</pre>")
    return "".join(out)


def link_names(fragment, anchors):
    """Each name the file defines, in the text of an HTML fragment, as a link to its definition."""
    def link(m):
        return f'<a href="#{m[0]}">{m[0]}</a>' if m[0] in anchors else m[0]
    out, in_link = [], False
    for part in re.split(r"(<[^>]*>)", fragment):
        if part.startswith("<"):
            in_link = bool(re.match(r"<a[\s>]", part)) or (in_link and not part.startswith("</a"))
            out.append(part)
        else:
            out.append(part if in_link else NAME.sub(link, part))
    return "".join(out)


def slug(title, taken):
    s = "sec-" + (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section")
    while s in taken:
        s += "-"
    taken.add(s)
    return s


def render_page(name, text, tree, tokens):
    """The HTML page of one file, and the first paragraph of its docstring (for the index)."""
    module_doc, blocks, anchors = split_file(text, tree, tokens)
    source, code = text.split("\n"), highlight(text)
    ids = {line: qualname for qualname, line in anchors.items()}
    parts, sections, taken = [], [], set()
    for block in blocks:
        if block["heading"] is not None:
            sid = slug(block["heading"], taken)
            sections.append((sid, block["heading"]))
            parts.append(f'<h2 class="section" id="{sid}">{esc(block["heading"])}</h2>')
        lines = block["code"]
        while lines and not source[lines[-1] - 1].strip():  # trailing blank lines
            lines = lines[:-1]
        if not block["prose"] and not lines:
            continue
        row_id = f' id="{ids[lines[0]]}"' if lines and lines[0] in ids else ""
        prose = "".join(render_prose(p) for p in block["prose"])
        rows = []
        for n in lines:
            if n in ids and n != lines[0]:
                rows.append(f'<span id="{ids[n]}">{code[n - 1]}</span>')
            else:
                rows.append(code[n - 1])
        pre = '<pre class="code">' + "\n".join(rows) + "</pre>" if lines else ""
        parts.append(f'<div class="row"{row_id}><div class="prose">{prose}</div>{pre}</div>')

    summary = " ".join(module_doc.split("\n\n")[0].split()) if module_doc else ""
    title = esc(name + (" \N{EM DASH} " + textwrap.shorten(summary, 90, placeholder=" ...") if summary else ""))
    toc = f'<div class="toc">{link_names(render_prose(module_doc), anchors)}</div>' if module_doc else ""
    nav = " &middot; ".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t in sections)
    nav = f'<nav class="sections">Sections: {nav}</nav>' if nav else ""
    page = PAGE.format(title=title, css=CSS, name=esc(name), toc=toc, nav=nav, body="\n".join(parts))
    return page, summary


def render_index(pages):
    """index.html: one line per page, its file name and the first paragraph of its docstring."""
    items = "\n".join(f'<li><a href="{esc(html_name)}">{esc(name)}</a> {esc(first)}</li>'
                      for name, html_name, first in pages)
    return INDEX.format(css=CSS, items=items)


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<p class="up"><a href="index.html">all files</a></p>
<h1>{name}</h1>
{toc}
{nav}
</header>
<main>
{body}
</main>
</body>
</html>
"""

INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>The paper files, annotated</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>The paper files, annotated</h1>
<p>Each page shows a file in two columns: the explanation (docstrings and comments) on the left, the code it
explains on the right. Each page opens with the file's docstring, whose names link to their definitions.</p>
<ul class="index">
{items}
</ul>
</header>
</body>
</html>
"""

MONO = 'ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace'
CSS = """
* { box-sizing: border-box; }
body { margin: 0; color: #1f2328; background: #fff;
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif; }
a { color: #0550ae; }
pre, code { font-family: MONO; font-size: 12.5px; line-height: 1.45; }
header { padding: 16px 24px 12px; border-bottom: 1px solid #d0d7de; }
header h1 { font-family: MONO; font-size: 22px; margin: 4px 0 8px; }
.up { margin: 0; font-size: 13px; }
.toc pre { background: #f6f8fa; padding: 10px 12px; border-radius: 6px; }
.sections { margin: 12px 0 4px; font-size: 14px; }
h2.section { margin: 0; padding: 20px 24px 8px; font-size: 18px; border-top: 2px solid #d0d7de; }
.row { display: grid; grid-template-columns: minmax(0, 38fr) minmax(0, 62fr); border-top: 1px solid #eaeef2; }
.prose { padding: 6px 20px 6px 24px; overflow-wrap: anywhere; }
.prose p { margin: 6px 0; }
.prose pre, .toc pre { overflow-x: auto; }
.prose pre { margin: 6px 0; font-size: 12px; }
pre.code { margin: 0; padding: 8px 16px; background: #f6f8fa; border-left: 1px solid #d0d7de; overflow-x: auto;
           grid-column: 2; }
.row:target, .row:target pre.code, pre.code span[id]:target { background: #fff8c5; }
.row, h2.section, pre.code span[id] { scroll-margin-top: 8px; }
ul.index li { margin: 6px 0; }
@media (max-width: 760px) {
  body { font-size: 15px; }
  header { padding: 12px 12px 8px; }
  h2.section { padding: 16px 12px 6px; }
  .row { grid-template-columns: minmax(0, 1fr); }
  .prose { padding: 4px 12px; }
  .prose:empty { display: none; }
  pre.code { grid-column: 1; border-left: 0; padding: 8px 12px; font-size: 12px; }
}
""".replace("MONO", MONO)
if PythonLexer is not None:
    CSS += "\n".join(HtmlFormatter(style="default").get_token_style_defs("pre.code")) + "\n"


# ----------------------------------------------------------------------------- output

def write_atomic(path, text):
    """Write through a temporary file in the same folder, then rename: a reader never sees half a page."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a page is as readable as any file written
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def take_screenshots(paths, out):
    """Headless chromium screenshots of each page at a laptop's and a phone's width, into out/screenshots/."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        print("screenshots: skipped (no chromium on PATH; Debian: apt-get install chromium)")
        return
    shots = out / "screenshots"
    shots.mkdir(exist_ok=True)
    for path in paths:
        for label, size in SIZES:
            png = shots / f"{path.stem}-{label}.png"
            with tempfile.TemporaryDirectory() as profile:
                cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                       "--disable-background-networking", "--disable-component-update", "--disable-sync",
                       "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
                       f"--screenshot={png}", path.resolve().as_uri()]
                try:
                    subprocess.run(cmd, capture_output=True, timeout=120)
                except subprocess.TimeoutExpired:
                    pass
            print(f"screenshot {png}" if png.exists() else f"screenshot of {path.name} at {size} failed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"Python files (default: {' '.join(PAPER_FILES)})")
    parser.add_argument("--out", default=str(ROOT / "out" / "annotated"), help="output folder")
    parser.add_argument("--screenshots", action="store_true", help="headless-chromium screenshots of every page")
    args = parser.parse_args(argv)
    out = Path(args.out)
    files = [Path(f) for f in args.files] or [ROOT / f for f in PAPER_FILES]
    try:
        pages, index = {}, []  # every page is built before the first is written
        for path in files:
            html_name = path.stem + ".html"
            if html_name in pages or html_name == "index.html":
                raise UsageError(f"{path}: its page would be {html_name}, which another file (or the index) takes")
            text, tree, tokens = read_source(path)
            pages[html_name], summary = render_page(path.name, text, tree, tokens)
            index.append((path.name, html_name, summary))
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: not a folder")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if mistune is None:
        print("warning: mistune is not installed (it comes with Jupyter): prose shown as plain text", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for html_name, page in pages.items():
            write_atomic(out / html_name, page)
        write_atomic(out / "index.html", render_index(index))
    except OSError as e:
        print(f"error: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(pages)} page{'s' * (len(pages) != 1)} and index.html to {out}")
    if args.screenshots:
        take_screenshots([out / name for name in pages] + [out / "index.html"], out)


if __name__ == "__main__":
    main()
