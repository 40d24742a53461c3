"""Documents to chat about: UTF-8 text files (plain text, Markdown, source code, ...).

    documents = load_documents(["notes.md", "book.txt"])
    text = documents_text(documents)      # what the model reads, before the first question

Every problem with a file raises DocumentError with a message that names the file and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DocumentError(ValueError):
    """A document (or prompt file) that cannot be read as text."""


@dataclass(frozen=True)
class Document:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return self.path.name


def read_text_file(path, what: str = "document") -> str:
    """The text of a UTF-8 file, with Windows line ends made Unix ones and a BOM dropped.

    `what` names the file in error messages ("document", "prompt file").
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DocumentError(f"{what} not found: {path}")
    if path.is_dir():
        raise DocumentError(f"{what} {path} is a folder; pass the files in it")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DocumentError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{what} {path} looks like a binary file (it has NUL bytes); "
                            "pass plain text or Markdown, e.g. convert a PDF with pdftotext first")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentError(f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                            f"{error.start}); convert it, e.g. iconv -f latin1 -t utf-8 {path.name}") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise DocumentError(f"{what} {path} is empty: there is no text to read")
    return text


def load_documents(paths) -> list[Document]:
    return [Document(Path(p).expanduser(), read_text_file(p)) for p in paths]


def documents_text(documents: list[Document]) -> str:
    """The documents as the model reads them: one file as is, several each under its name."""
    if len(documents) == 1:
        return documents[0].text.strip()
    return "\n\n".join(f"### {doc.name}\n\n{doc.text.strip()}" for doc in documents)
