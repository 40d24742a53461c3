"""Documents to chat about: text and Markdown, PDF, EPUB, HTML and DOCX files, folders of them, stdin.

    documents = load_documents(["notes.md", "paper.pdf", "book.epub", "papers/", "-"])
    text = documents_text(documents)      # what the model reads, before the first question

The type is decided by the content, not the extension (sniff):
  pdf    starts with %PDF-; its text layer (pypdf), each page under a line "--- page N ---"
  epub   a ZIP whose mimetype is application/epub+zip; the chapters in spine order (ebooklib),
         each under "--- chapter N ---", HTML reduced to text
  docx   a ZIP holding word/document.xml; paragraphs and tables in document order (python-docx),
         headings as "# ...", table rows as cells joined by " | "
  html   text that opens with <!doctype html>, <html>, <head> or <body>; the text of <main> (or the
         one <article>, else <body>) without scripts, styles, navigation, headers, footers, forms
  text   anything else that decodes as UTF-8 (or UTF-16 with a BOM): as is; "markdown" for .md
A folder is every supported file in it and its subfolders (hidden ones skipped), sorted by path,
each named by its path inside the folder. "-" is standard input, read as text.

Every problem with a file raises DocumentError with a one-line message that names the file and the fix.
"""
from __future__ import annotations

import io
import logging
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STDIN = "-"
KINDS = ("text", "markdown", "pdf", "epub", "docx", "html")
SECTION_NAMES = {"pdf": "pages", "epub": "chapters"}   # Document.sections counts these
MARKDOWN_SUFFIXES = {".md", ".markdown", ".mdown", ".mkd"}

# progress while extracting: (name, sections done, sections in all)
Progress = Callable[[str, int, int], None]


class DocumentError(ValueError):
    """A document (or prompt file) that cannot be read as text."""


@dataclass(frozen=True)
class Document:
    path: Path
    text: str
    kind: str = "text"              # one of KINDS
    sections: int | None = None     # pages of a PDF, chapters of an EPUB
    label: str | None = None        # the name it goes under, when not the file's (a folder's files, stdin)

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def sections_name(self) -> str | None:
        return SECTION_NAMES.get(self.kind)


# ----------------------------------------------------------------------------- loading

def load_documents(paths, on_progress: Progress | None = None) -> list[Document]:
    """The documents at `paths`: files of any supported type, folders (their supported files), "-" (stdin)."""
    documents = []
    if sum(str(p) == STDIN for p in paths) > 1:
        raise DocumentError("standard input (-) can be read only once; pass it as one --doc")
    for p in paths:
        if str(p) == STDIN:
            data = sys.stdin.buffer.read()
            documents.append(Document(Path("stdin"), _text(data, "standard input", "document"), "text", label="stdin"))
            continue
        path = Path(p).expanduser()
        if path.is_dir():
            documents.extend(load_folder(path, on_progress))
        else:
            documents.append(load_document(path, on_progress))
    return documents


def load_folder(folder: Path, on_progress: Progress | None = None) -> list[Document]:
    """Every supported file in `folder` and its subfolders, sorted by path; hidden files and folders
    and files of other types (images, archives, ...) are skipped."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    documents = []
    for path in files:
        try:
            data = _read_bytes(path, "document")
            kind = sniff(data, path)
        except DocumentError:
            continue  # unreadable or not a document: not what the folder is passed for
        if kind not in KINDS:
            continue
        label = f"{folder.name}/{path.relative_to(folder).as_posix()}"
        documents.append(_extract(path, data, kind, on_progress, label))
    if not documents:
        raise DocumentError(f"folder {folder} has no documents ({', '.join(KINDS)}) in it")
    return documents


def load_document(path, on_progress: Progress | None = None, label: str | None = None) -> Document:
    path = Path(path).expanduser()
    data = _read_bytes(path, "document")
    return _extract(path, data, sniff(data, path), on_progress, label)


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise DocumentError(f"{what} not found: {path}")
    if path.is_dir():
        raise DocumentError(f"{what} {path} is a folder; pass the files in it")
    try:
        return path.read_bytes()
    except OSError as error:
        raise DocumentError(f"cannot read {what} {path}: {error.strerror or error}") from None


def read_text_file(path, what: str = "document") -> str:
    """The text of a UTF-8 file, with Windows line ends made Unix ones and a BOM dropped.

    `what` names the file in error messages ("document", "prompt file").
    """
    path = Path(path).expanduser()
    return _text(_read_bytes(path, what), path, what)


def _text(data: bytes, path, what: str) -> str:
    name = Path(str(path)).name
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    elif b"\x00" in data[:8192]:
        raise DocumentError(f"{what} {path} looks like a binary file (it has NUL bytes) of no type read here; "
                            f"pass text, Markdown, PDF, EPUB, HTML or DOCX")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise DocumentError(f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                                f"{error.start}); convert it, e.g. iconv -f latin1 -t utf-8 {name}") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise DocumentError(f"{what} {path} is empty: there is no text to read")
    return text


# ----------------------------------------------------------------------------- types

# magic bytes of files people may pass by mistake: (prefix, what it is)
OTHER_TYPES = [
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"), (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"), (b"\xd0\xcf\x11\xe0", "an old Office file (.doc, .xls, .ppt)"),
    (b"{\\rtf", "an RTF document"), (b"GGUF", "a GGUF model"), (b"\x7fELF", "an executable (ELF)"),
    (b"ID3", "an MP3 file"), (b"OggS", "an Ogg file"), (b"fLaC", "a FLAC file"),
]
ZIP_TYPES = [  # (file in the archive, what it is), for ZIPs that are neither EPUB nor DOCX
    ("xl/workbook.xml", "an Excel workbook (.xlsx)"), ("ppt/presentation.xml", "a PowerPoint file (.pptx)"),
    ("content.xml", "an OpenDocument file (.odt, .ods, .odp)"),
]
HTML_START = re.compile(r"\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)\b",
                        re.IGNORECASE | re.DOTALL)


def sniff(data: bytes, path=None) -> str:
    """The document's kind (one of KINDS), from its bytes; raises DocumentError naming any other type."""
    name = path if path is not None else "document"
    suffix = Path(str(path)).suffix.lower() if path is not None else ""
    if b"%PDF-" in data[:1024]:
        return "pdf"
    if data.startswith(b"PK\x03\x04") or suffix in (".epub", ".docx"):
        return _sniff_zip(data, name, suffix)
    for magic, what in OTHER_TYPES:
        if data.startswith(magic):
            raise DocumentError(f"document {name} is {what}, not a type read here "
                                "(text, Markdown, PDF, EPUB, HTML, DOCX)")
    if suffix == ".pdf" and b"\x00" in data[:8192]:
        raise DocumentError(f"document {name} is not a PDF: it does not start with %PDF- (damaged, or another type)")
    head = data[:4096].decode("utf-8", errors="ignore").lstrip("\ufeff")
    if HTML_START.match(head):
        return "html"
    return "markdown" if suffix in MARKDOWN_SUFFIXES else "text"


def _sniff_zip(data: bytes, name, suffix: str) -> str:
    expected = {".epub": "EPUB", ".docx": "DOCX"}.get(suffix, "ZIP (EPUB or DOCX)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            mimetype = archive.read("mimetype").strip() if "mimetype" in names else b""
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
        raise DocumentError(f"document {name} is a damaged or truncated {expected} file "
                            "(its ZIP directory cannot be read); get a complete copy") from None
    if mimetype == b"application/epub+zip":
        return "epub"
    if "word/document.xml" in names:
        return "docx"
    what = next((what for member, what in ZIP_TYPES if member in names), None)
    if mimetype and what is None:
        what = f"a ZIP of type {mimetype.decode('ascii', errors='replace')}"
    raise DocumentError(f"document {name} is {what or 'a ZIP archive'}, not a type read here "
                        "(text, Markdown, PDF, EPUB, HTML, DOCX)")


def _extract(path: Path, data: bytes, kind: str, on_progress: Progress | None, label: str | None) -> Document:
    name = label or path.name
    progress = on_progress or (lambda name, done, total: None)
    if kind in ("text", "markdown"):
        return Document(path, _text(data, path, "document"), kind, label=label)
    try:
        with warnings.catch_warnings():  # the libraries' warnings about odd files are not the user's business
            warnings.simplefilter("ignore")
            if kind == "pdf":
                text, sections = _pdf_text(data, path, name, progress)
            elif kind == "epub":
                text, sections = _epub_text(path, name, progress)
            elif kind == "docx":
                text, sections = _docx_text(data), None
            else:
                text, sections = html_to_text(data), None
    except DocumentError:
        raise
    except Exception as error:  # the parsers raise many kinds for a damaged file
        what = kind.upper()
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise DocumentError(f"document {path} is a damaged {what} file ({detail}); get a complete copy") from None
    if not text.strip():
        raise DocumentError(f"document {path} ({kind.upper()}) has no text in it")
    return Document(path, text, kind, sections, label)


# ----------------------------------------------------------------------------- PDF

def _pdf_text(data: bytes, path: Path, name: str, progress: Progress) -> tuple[str, int]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError
    if b"%%EOF" not in data[-2048:]:
        raise DocumentError(f"document {path} is a truncated PDF (no %%EOF at its end); get a complete copy")
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")  # an owner password only: readable without one
        except DependencyError:
            raise DocumentError(f"document {path} is an encrypted PDF (AES), which needs the cryptography "
                                f"package to read: pip install cryptography, or decrypt it first: "
                                f"qpdf --decrypt {path.name} decrypted.pdf") from None
        if not opened:
            raise DocumentError(f"document {path} is an encrypted PDF that needs a password; decrypt it first: "
                                f"qpdf --decrypt --password=PASSWORD {path.name} decrypted.pdf")
    try:
        pages = reader.pages
        n_pages = len(pages)
        texts = []
        progress(name, 0, n_pages)
        for number, page in enumerate(pages, 1):
            texts.append(f"--- page {number} ---\n{(page.extract_text() or '').strip()}")
            progress(name, number, n_pages)
    except FileNotDecryptedError:
        raise DocumentError(f"document {path} is an encrypted PDF that needs a password; decrypt it first: "
                            f"qpdf --decrypt --password=PASSWORD {path.name} decrypted.pdf") from None
    if not any(text.split("\n", 1)[1].strip() for text in texts):
        pages_said = f"{n_pages} page{'s' if n_pages != 1 else ''}"
        raise DocumentError(f"document {path} is a PDF of {pages_said} with no extractable text (a scan, or "
                            f"images only); run OCR on it first, e.g. ocrmypdf {path.name} ocr.pdf")
    return "\n\n".join(texts), n_pages


# ----------------------------------------------------------------------------- EPUB

def _epub_text(path: Path, name: str, progress: Progress) -> tuple[str, int]:
    import ebooklib
    from ebooklib import epub
    book = epub.read_epub(str(path), {"ignore_ncx": True})
    items = [book.get_item_with_id(idref) for idref, *_ in book.spine]
    items = [item for item in items if item is not None and item.get_type() == ebooklib.ITEM_DOCUMENT]
    chapters = []
    progress(name, 0, len(items))
    for done, item in enumerate(items, 1):
        text = html_to_text(item.get_content())
        if text.strip():
            chapters.append(text)
        progress(name, done, len(items))
    return "\n\n".join(f"--- chapter {n} ---\n{text}" for n, text in enumerate(chapters, 1)), len(chapters)


# ----------------------------------------------------------------------------- DOCX

def _docx_text(data: bytes) -> str:
    import docx
    from docx.table import Table
    document = docx.Document(io.BytesIO(data))
    blocks = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            blocks.append(_docx_table(block))
            continue
        text = block.text.strip()
        style = (block.style.name or "") if block.style is not None else ""
        level = re.fullmatch(r"Heading (\d)", style)
        if text:
            blocks.append(f"{'#' * int(level.group(1))} {text}" if level else ("# " + text if style == "Title" else text))
    return "\n\n".join(block for block in blocks if block)


def _docx_table(table) -> str:
    rows = []
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:  # a merged cell comes once per grid column it spans: once here
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        rows.append(" | ".join(cells))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- HTML

DROPPED = {"script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "iframe",
           "svg", "canvas", "button", "select", "head", "title", "meta", "link", "object", "embed"}
BLOCKS = {"p", "div", "section", "article", "main", "blockquote", "pre", "ul", "ol", "dl", "table", "h1", "h2",
          "h3", "h4", "h5", "h6", "hr", "figure", "figcaption", "address", "body"}   # a blank line around
LINES = {"li", "tr", "dt", "dd", "caption"}                                          # a line of their own


def html_to_text(data: bytes | str) -> str:
    """The readable text of an HTML (or XHTML) page: its main part without scripts, styles and navigation."""
    import lxml.html
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not data.strip():
        return ""
    root = lxml.html.document_fromstring(data)
    for element in list(root.iter()):
        tag = _tag(element)
        if tag in ("header", "footer") and any(_tag(up) in ("main", "article") for up in element.iterancestors()):
            continue  # an article's own header (its title, byline) is part of it
        if (tag in DROPPED or element.get("hidden") is not None or element.get("aria-hidden") == "true"
                or element.get("role") in ("navigation", "banner", "contentinfo")):
            if element.getparent() is not None:
                element.drop_tree()  # keeps its tail text
    main = root.findall(".//main") or root.findall(".//article")
    body = main[0] if len(main) == 1 else (root.find("body") if root.find("body") is not None else root)
    parts: list[str] = []
    _walk(body, parts, pre=False)
    text = "".join(parts)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _tag(element) -> str:
    return element.tag.rsplit("}", 1)[-1].lower() if isinstance(element.tag, str) else ""


def _walk(element, parts: list[str], pre: bool) -> None:
    tag = _tag(element)
    pre = pre or tag == "pre"

    def add(text):
        if text:
            parts.append(text if pre else re.sub(r"\s+", " ", text))

    if tag in BLOCKS:
        parts.append("\n\n")
    elif tag in LINES or tag == "br":
        parts.append("\n")
    if tag == "li":
        parts.append("- ")
    elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
        parts.append("#" * int(tag[1]) + " ")
    elif tag in ("td", "th") and element.getprevious() is not None:
        parts.append(" | ")
    if tag:  # not a comment or processing instruction
        add(element.text)
        for child in element:
            _walk(child, parts, pre)
    if tag in BLOCKS:
        parts.append("\n\n")
    add(element.tail)


# ----------------------------------------------------------------------------- the model's text

def documents_text(documents: list[Document]) -> str:
    """The documents as the model reads them: one file as is, several each under its name."""
    if len(documents) == 1:
        return documents[0].text.strip()
    return "\n\n".join(f"### {doc.name}\n\n{doc.text.strip()}" for doc in documents)
