"""Documents of every supported type, written at test time (no binary fixtures): what the model reads
from each, and the one-line errors for files that cannot be read."""
import io
from pathlib import Path

import pytest

from selfextend_gguf.documents import DocumentError, documents_text, load_documents, sniff
from selfextend_gguf.testing.cli import run_cli
from selfextend_gguf.testing.documents import make_pdf

PAGES = ["Page one says alpha.\nA second line.", "Page two says beta.", "Page three says gamma."]


def encrypted(pdf: bytes, user_password: str) -> bytes:
    from pypdf import PdfWriter
    writer = PdfWriter(clone_from=io.BytesIO(pdf))
    writer.encrypt(user_password, owner_password="owner", algorithm="RC4-128")  # RC4: no cryptography package
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_epub(path):
    from ebooklib import epub
    book = epub.EpubBook()
    book.set_identifier("test-book")
    book.set_title("Two Chapters")
    book.set_language("en")
    one = epub.EpubHtml(title="One", file_name="one.xhtml", lang="en")
    one.content = "<h1>Chapter One</h1><p>The ship sails at dawn.</p>"
    two = epub.EpubHtml(title="Two", file_name="two.xhtml", lang="en")
    two.content = "<h1>Chapter Two</h1><p>The storm comes at noon.</p><script>var hidden = 1;</script>"
    book.add_item(two)  # stored before chapter one: the spine, not the archive, gives the order
    book.add_item(one)
    book.toc = [one, two]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", one, two]
    epub.write_epub(str(path), book)
    return path


def make_docx(path):
    import docx
    document = docx.Document()
    document.add_heading("Report", 1)
    document.add_paragraph("Before the table.")
    table = document.add_table(rows=2, cols=2)
    for (row, column), text in {(0, 0): "Name", (0, 1): "Key", (1, 0): "alpha", (1, 1): "4242"}.items():
        table.cell(row, column).text = text
    document.add_paragraph("After the table.")
    document.save(str(path))
    return path


HTML = """<!DOCTYPE html><html><head><title>Site</title><style>body { color: red }</style>
<script>alert("script")</script></head><body><nav><a href="/">Home</a> <a href="/about">About us</a></nav>
<header>Site banner</header><main><h1>The Article</h1><p>First   paragraph with <b>bold</b> text.</p>
<ul><li>one</li><li>two</li></ul></main><footer>Copyright</footer><script>track()</script></body></html>"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("documents")
    paths = {"pdf": folder / "three.pdf", "scan": folder / "scan.pdf", "locked": folder / "locked.pdf",
             "owner_only": folder / "owner-only.pdf", "epub": folder / "book.epub", "docx": folder / "report.docx",
             "html": folder / "page.html", "markdown": folder / "notes.md"}
    pdf = make_pdf(PAGES)
    paths["pdf"].write_bytes(pdf)
    paths["scan"].write_bytes(make_pdf([None, None]))
    paths["locked"].write_bytes(encrypted(pdf, "secret"))
    paths["owner_only"].write_bytes(encrypted(pdf, ""))
    make_epub(paths["epub"])
    make_docx(paths["docx"])
    paths["html"].write_text(HTML)
    paths["markdown"].write_text("# Notes\n\nThe key is 7.\n")
    for kind in ("pdf", "epub", "docx"):  # each binary type cut in half
        data = paths[kind].read_bytes()
        paths[f"cut_{kind}"] = folder / f"cut-{paths[kind].name}"
        paths[f"cut_{kind}"].write_bytes(data[: len(data) // 2])
    paths["png"] = folder / "picture.pdf"  # the extension lies: the content decides
    paths["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    paths["xlsx"] = folder / "sheet.xlsx"
    import zipfile
    with zipfile.ZipFile(paths["xlsx"], "w") as archive:
        archive.writestr("xl/workbook.xml", "<workbook/>")
    return paths


def test_pdf_pages_in_order_each_marked(files):
    [doc] = load_documents([files["pdf"]])
    assert (doc.kind, doc.sections, doc.sections_name) == ("pdf", 3, "pages")
    assert doc.text == ("--- page 1 ---\nPage one says alpha.\nA second line.\n\n--- page 2 ---\nPage two says beta."
                        "\n\n--- page 3 ---\nPage three says gamma.")


def test_pdf_with_only_an_owner_password_reads(files):
    assert load_documents([files["owner_only"]])[0].text == load_documents([files["pdf"]])[0].text


def test_epub_chapters_in_spine_order_without_html(files):
    [doc] = load_documents([files["epub"]])
    assert (doc.kind, doc.sections) == ("epub", 2)  # the nav page is navigation only: dropped
    assert doc.text == ("--- chapter 1 ---\n# Chapter One\n\nThe ship sails at dawn.\n\n"
                        "--- chapter 2 ---\n# Chapter Two\n\nThe storm comes at noon.")


def test_html_main_text_without_navigation_scripts_styles(files):
    [doc] = load_documents([files["html"]])
    assert doc.kind == "html"
    assert doc.text == "# The Article\n\nFirst paragraph with bold text.\n\n- one\n- two"


def test_docx_paragraphs_and_table_in_document_order(files):
    [doc] = load_documents([files["docx"]])
    assert doc.kind == "docx" and doc.sections is None
    assert doc.text == "# Report\n\nBefore the table.\n\nName | Key\nalpha | 4242\n\nAfter the table."


def test_type_is_decided_by_content(files, tmp_path):
    renamed = tmp_path / "book.txt"
    renamed.write_bytes(files["epub"].read_bytes())
    assert load_documents([renamed])[0].kind == "epub"
    html = tmp_path / "page.txt"
    html.write_text(HTML)
    assert sniff(html.read_bytes(), html) == "html"
    assert sniff(b"# title\n", "a.md") == "markdown" and sniff(b"plain", "a.log") == "text"


def test_folder_every_supported_file_sorted_recursively(files, tmp_path):
    folder = tmp_path / "papers"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "sub" / "c.pdf").write_bytes(files["pdf"].read_bytes())
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))  # not a document: skipped
    (folder / ".hidden.txt").write_text("hidden")
    docs = load_documents([folder])
    assert [d.name for d in docs] == ["papers/a.txt", "papers/b.md", "papers/sub/c.pdf"]
    assert documents_text(docs).startswith("### papers/a.txt\n\nay\n\n### papers/b.md\n\nbee")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DocumentError, match="has no documents"):
        load_documents([empty])


def test_progress_is_reported_per_page(files):
    seen = []
    load_documents([files["pdf"]], on_progress=lambda name, done, total: seen.append((name, done, total)))
    assert seen == [("three.pdf", 0, 3), ("three.pdf", 1, 3), ("three.pdf", 2, 3), ("three.pdf", 3, 3)]


ERRORS = {
    "scan": r"is a PDF of 2 pages with no extractable text .*ocrmypdf",
    "locked": r"is an encrypted PDF that needs a password; decrypt it first: qpdf --decrypt",
    "cut_pdf": r"is a truncated PDF",
    "cut_epub": r"is a damaged or truncated EPUB file",
    "cut_docx": r"is a damaged or truncated DOCX file",
    "png": r"is a PNG image, not a type read here",
    "xlsx": r"is an Excel workbook \(\.xlsx\), not a type read here",
}


@pytest.mark.parametrize("case", ERRORS)
def test_unreadable_documents_raise_one_line(case, files):
    with pytest.raises(DocumentError, match=ERRORS[case]) as error:
        load_documents([files[case]])
    assert "\n" not in str(error.value) and str(files[case]) in str(error.value)


def cli(*args, stdin=""):
    return run_cli(*args, stdin=stdin)


@pytest.mark.parametrize("case", ERRORS)
def test_cli_errors_exit_2_with_one_line(case, files, tiny_f32_gguf):
    result = cli("run", "--model", tiny_f32_gguf, "--doc", files[case], "-p", "hi", "-n", 1)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfextend-gguf: error: document "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_cli_reads_every_type_and_stdin(files, tiny_f32_gguf):
    result = cli("run", "--model", tiny_f32_gguf, "--raw", "--doc", files["pdf"], files["epub"], files["docx"],
                 files["html"], "-", "-p", "The key is", "-n", 1, stdin="From standard input.\n")
    assert result.returncode == 0, result.stderr
    assert "read three.pdf, book.epub, report.docx, page.html, stdin:" in result.stderr


def test_chat_refuses_stdin_as_a_document_when_questions_come_from_it(tiny_f32_gguf):
    result = cli("chat", "--model", tiny_f32_gguf, "--doc", "-", stdin="a question\n")
    assert result.returncode == 2 and "would use up standard input" in result.stderr


def test_info_shows_each_document_and_the_settings_it_needs(files, tiny_f32_gguf):
    result = cli("info", "--model", tiny_f32_gguf, "--doc", files["pdf"], files["epub"], files["docx"], files["html"])
    assert result.returncode == 0, result.stderr
    import re
    assert re.search(r"three\.pdf\s+\S?\s*pdf\s+\S?\s*3 pages\s+\S?\s*125\s", result.stdout), result.stdout
    assert re.search(r"book\.epub\s+\S?\s*epub\s+\S?\s*2 chapters", result.stdout), result.stdout
    assert re.search(r"prompt with the documents: [\d,]+ tokens \(chat format\)", result.stdout)
    assert re.search(r"chat: n_ctx [\d,]+, --grp-attn-n \d+ --grp-attn-w 8, reaching", result.stdout), result.stdout
    assert re.search(r"run -n 256: n_ctx [\d,]+, --grp-attn-n \d+ --grp-attn-w 8", result.stdout), result.stdout
    bad = cli("info", "--model", tiny_f32_gguf, "--doc", files["scan"])
    assert bad.returncode == 2 and "no extractable text" in bad.stderr and "Traceback" not in bad.stderr


def test_the_readme_pdf_example_reads_back_with_the_key_on_one_page(tmp_path):
    """examples/make_long_document.py long.pdf: the README's scripted PDF check reads the same text."""
    import runpy
    pdf = tmp_path / "long.pdf"
    example = Path(__file__).resolve().parents[1] / "examples" / "make_long_document.py"
    runpy.run_path(str(example), run_name="not_main")["main"]([str(pdf), "--tokens", "3000"])
    document, = load_documents([pdf])
    assert document.kind == "pdf" and document.sections > 1
    pages = document.text.split("--- page ")[1:]
    assert len(pages) == document.sections
    assert [("The pass key is 71432." in page) for page in pages].count(True) == 1
