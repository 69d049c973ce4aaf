"""Read documents from files, folders, JSONL and the built-in corpus into plain text.

Policy for bad files (the CLI prints these as warnings and goes on): a binary file (NUL bytes in its
first 8 KiB) or an unreadable one is skipped; a file that is not valid UTF-8 is skipped unless
`on_undecodable="replace"` (decode with U+FFFD) or `"fail"`. A path that does not exist is an error
(most likely a typo), and so is a corpus with no text left after skipping.
"""

from __future__ import annotations

import html.parser
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from datastore_tools.errors import DatastoreToolError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
JSONL_SUFFIXES = (".jsonl",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES
UNDECODABLE_POLICIES = ("skip", "replace", "fail")
DEFAULT_CORPUS_PREFIX = "pydoc_data.topics:"


@dataclass(frozen=True)
class Document:
    source: str
    title: str
    text: str


@dataclass
class IngestReport:
    documents: int = 0
    files_read: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason", one per skipped file or line
    empty: int = 0  # documents with no text after stripping


class _TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML page: drops script/style, keeps <title> apart, breaks at blocks."""

    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section",
             "article", "dt", "dd", "table", "blockquote", "header", "footer"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip_depth = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip_depth += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._skip_depth:
            return
        if self._in_title:
            self.title_parts.append(data)
        else:
            self.parts.append(data)


def strip_html(markup: str) -> tuple[str, str]:
    """(title, visible text) of an HTML document; whitespace runs inside lines are collapsed."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    text = "\n".join(line for line in lines if line)
    return " ".join("".join(parser.title_parts).split()), text


def _first_line_title(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line and set(line) - set("=-~^*+#`:'\"."):
            return line[:120]
    return ""


def default_corpus() -> list[Document]:
    """The Python language reference shipped with CPython: one document per pydoc topic."""
    from pydoc_data.topics import topics

    return [
        Document(DEFAULT_CORPUS_PREFIX + name, name, topics[name])
        for name in sorted(topics)
        if topics[name].strip()
    ]


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(KNOWN_SUFFIXES)
            )
            if not found:
                log.warning("%s: no files ending in %s", path, ", ".join(KNOWN_SUFFIXES))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise DatastoreToolError(f"input {path} does not exist; check the path")
    return files


def _read_text(path: Path, on_undecodable: str, report: IngestReport) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as error:
        report.skipped.append(f"{path}: unreadable ({error.strerror or error}); check its permissions")
        return None
    if b"\0" in raw[:8192]:
        report.skipped.append(f"{path}: binary file (NUL bytes); give text, Markdown, RST, HTML or JSONL")
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        where = f"invalid UTF-8 at byte {error.start}"
        if on_undecodable == "replace":
            log.warning("%s: %s; undecodable bytes replaced with U+FFFD", path, where)
            return raw.decode("utf-8", errors="replace")
        if on_undecodable == "fail":
            raise DatastoreToolError(
                f"{path}: {where}; convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
                "or pass --on-undecodable skip|replace"
            ) from error
        report.skipped.append(f"{path}: {where}; convert it to UTF-8 or pass --on-undecodable replace")
        return None


def _read_jsonl(path: Path, text: str, field_name: str, report: IngestReport) -> list[Document]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            report.skipped.append(f"{path}:{number}: not JSON ({error.msg})")
            continue
        value = record.get(field_name) if isinstance(record, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            report.skipped.append(
                f"{path}:{number}: no string field {field_name!r} (has: {keys}); set --jsonl-field"
            )
            continue
        title = record.get("title") if isinstance(record.get("title"), str) else ""
        documents.append(Document(f"{path}:{number}", title or _first_line_title(value), value))
    return documents


def read_documents(
    inputs: Iterable[str | Path] = (),
    *,
    use_default_corpus: bool = False,
    jsonl_field: str = "text",
    on_undecodable: str = "skip",
) -> tuple[list[Document], IngestReport]:
    """All documents of the inputs in a stable order (default corpus first, then sorted files)."""
    if on_undecodable not in UNDECODABLE_POLICIES:
        raise DatastoreToolError(
            f"unknown --on-undecodable {on_undecodable!r}; choose one of {', '.join(UNDECODABLE_POLICIES)}"
        )
    report = IngestReport()
    candidates: list[Document] = default_corpus() if use_default_corpus else []
    for path in expand_inputs(inputs):
        text = _read_text(path, on_undecodable, report)
        if text is None:
            continue
        report.files_read += 1
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            candidates.extend(_read_jsonl(path, text, jsonl_field, report))
        elif suffix in HTML_SUFFIXES:
            title, body = strip_html(text)
            candidates.append(Document(str(path), title or _first_line_title(body), body))
        else:
            candidates.append(Document(str(path), _first_line_title(text), text))
    documents = []
    for document in candidates:
        if document.text.strip():
            documents.append(document)
        else:
            report.empty += 1
    for line in report.skipped:
        log.warning("skipped %s", line)
    report.documents = len(documents)
    if not documents:
        detail = ""
        if report.skipped or report.empty:
            named = "; ".join(report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else "")
            detail = f" ({len(report.skipped)} input(s) skipped: {named}; {report.empty} empty)"
        raise DatastoreToolError(
            f"empty corpus: no text to index{detail}; pass files or folders with text "
            "(.txt, .md, .rst, .html, .jsonl) or --default-corpus"
        )
    return documents, report
