"""Build the shipped offline demo probe set from Python's own documentation.

Run ``python scripts/build_demo_set.py`` to rebuild ``dkacq/data/demo/train.jsonl.gz`` and
``test.jsonl.gz`` (and the version stamp in its ``__init__.py``) in place; a developer tool that does not
ship with the package, which ships only the data. The text is what every CPython installation carries: the
language-reference topics of ``pydoc_data.topics`` and the docstrings of a fixed list of
standard-library modules. Both change between Python releases, so the files are only reproducible
with the Python version recorded in ``dkacq.data.demo.BUILT_WITH_PYTHON``.

The examples follow inverse-cloze-task pretraining (Lee et al. 2019): documents are cut into
passages of a few sentences, one sentence of a passage becomes the query and the rest of the passage
is its positive. The hard negatives of an example are the 4 positives of the same split, from other
documents, that score highest under BM25 against the query. Negatives are therefore texts of the same
form as positives (a passage less one sentence), so length or shape gives nothing away. Documents,
not examples, are assigned to the train or the test split.
"""

from __future__ import annotations

import ast
import gzip
import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import json
import math
import random
import re
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dkacq.data.examples import EXAMPLE_COLUMNS
from dkacq.formats.atomic import atomic_write, atomic_write_text

DEMO_DIR = Path(__file__).resolve().parents[1] / "dkacq" / "data" / "demo"
SPLIT_FILES = {"train": DEMO_DIR / "train.jsonl.gz", "test": DEMO_DIR / "test.jsonl.gz"}
COLUMNS = (*EXAMPLE_COLUMNS, "document")
SEED = 42
TEST_FRACTION = 0.2
NUM_NEGATIVES = 4
MIN_PASSAGE_WORDS = 35
MAX_PASSAGE_WORDS = 100
MIN_PASSAGE_SENTENCES = 3
MIN_QUERY_WORDS = 6
MIN_POSITIVE_WORDS = 20
MIN_SENTENCE_WORDS = 5
MAX_SENTENCE_WORDS = 60
BM25_K1 = 0.9
BM25_B = 0.4

# Standard-library modules that exist on every platform; platform-only definitions inside them sit
# in ``if`` blocks, which the reader skips, so a rebuild depends on the Python version only. A module
# missing from some Python version is skipped.
MODULES = (
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.protocols",
    "asyncio.queues",
    "asyncio.runners",
    "asyncio.streams",
    "asyncio.tasks",
    "asyncio.timeouts",
    "asyncio.transports",
    "base64",
    "bdb",
    "binascii",
    "builtins",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "collections.abc",
    "concurrent.futures._base",
    "concurrent.futures.process",
    "concurrent.futures.thread",
    "configparser",
    "contextlib",
    "copy",
    "cProfile",
    "csv",
    "dataclasses",
    "difflib",
    "dis",
    "doctest",
    "email._header_value_parser",
    "email.charset",
    "email.errors",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "genericpath",
    "getopt",
    "graphlib",
    "gzip",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib.abc",
    "importlib.metadata",
    "importlib.util",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "linecache",
    "logging",
    "logging.config",
    "logging.handlers",
    "mailbox",
    "math",
    "mimetypes",
    "modulefinder",
    "ntpath",
    "numbers",
    "optparse",
    "pathlib",
    "pdb",
    "pickletools",
    "pkgutil",
    "plistlib",
    "poplib",
    "posixpath",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "rlcompleter",
    "runpy",
    "sched",
    "shelve",
    "shlex",
    "smtplib",
    "statistics",
    "string",
    "struct",
    "symtable",
    "tabnanny",
    "tarfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unittest.case",
    "unittest.loader",
    "unittest.mock",
    "unittest.result",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "wsgiref.handlers",
    "wsgiref.headers",
    "wsgiref.util",
    "wsgiref.validate",
    "xml.dom.expatbuilder",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xml.sax.xmlreader",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipapp",
    "zipfile",
    "zipimport",
    "_pyio",
)

_HEADING_RULE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$")
_NOT_PROSE = re.compile(r">>>|::=|^\s*[+|]", re.MULTILINE)
_LIST_MARKER = re.compile(r"^\s*(?:[*\-]|\d+\.|\(\d+\))\s+")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“(*]?[A-Z])")
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|No)\.|\b[A-Z]\.)$")
_TOKEN = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Example:
    """One inverse-cloze example before negatives are attached."""

    document: str
    query: str
    positive: str


def source_units() -> Iterator[tuple[str, str]]:
    """Yield ``(document, text)`` for every block of documentation, in a fixed order.

    A document is one pydoc topic or one module; passages never span two blocks. A topic's blocks
    are its sections (between headings). A module's blocks are its docstring followed by its public
    functions' docstrings (one-line function docstrings alone are too short for a passage), then one
    block per public class: the class docstring and its public methods' docstrings.
    """
    from pydoc_data.topics import topics

    for name in sorted(topics):
        section: list[str] = []
        for line in topics[name].splitlines():
            if _HEADING_RULE.match(line):
                if section:
                    section.pop()
                yield f"topic:{name}", "\n".join(section)
                section = []
            else:
                section.append(line)
        yield f"topic:{name}", "\n".join(section)

    for module_name in MODULES:
        for block in _module_blocks(module_name):
            yield f"module:{module_name}", "\n\n".join(doc for doc in block if doc)


def _module_blocks(module_name: str) -> list[list[str | None]]:
    """A module's blocks, each a list of cleaned docstrings (None: no docstring); no blocks for a
    module this Python lacks.

    Modules with Python source are read with ``ast``, not imported: importing runs code, and other
    libraries loaded in the same process patch the standard library (torch replaces
    ``inspect.getfile``), which would change the build. Only definitions at the top level of the
    module (and of its classes) count, so definitions made for one platform only are left out.
    Extension modules (``builtins``, ``math``, ...) are imported and read from their objects.
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        return []
    if spec is None:
        return []
    source = _module_source(spec)
    if source is not None:
        tree = ast.parse(source)
        definitions = _public_definitions(tree.body)
        functions = [ast.get_docstring(node) for node in definitions if not isinstance(node, ast.ClassDef)]
        blocks = [[ast.get_docstring(tree), *functions]]
        for cls in (node for node in definitions if isinstance(node, ast.ClassDef)):
            methods = _public_definitions(cls.body, methods=True)
            blocks.append([ast.get_docstring(cls), *(ast.get_docstring(method) for method in methods)])
        return blocks
    module = importlib.import_module(module_name)
    public = [
        obj
        for name, obj in sorted(vars(module).items())
        if not name.startswith("_") and getattr(obj, "__module__", None) == module_name
    ]
    functions = [inspect.cleandoc(obj.__doc__ or "") for obj in public if inspect.isroutine(obj)]
    blocks: list[list[str | None]] = [[inspect.cleandoc(module.__doc__ or ""), *functions]]
    blocks.extend(list(_class_docstrings(cls)) for cls in public if inspect.isclass(cls))
    return blocks


def _module_source(spec: importlib.machinery.ModuleSpec) -> str | None:
    """The module's Python source; frozen standard-library modules (``abc``, ``posixpath``, ...)
    name their source file in ``loader_state``."""
    if hasattr(spec.loader, "get_source"):
        source = spec.loader.get_source(spec.name)
        if source is not None:
            return source
    filename = getattr(spec.loader_state, "filename", None)
    return Path(filename).read_text(encoding="utf-8") if filename else None


def _public_definitions(body: list[ast.stmt], methods: bool = False) -> list[ast.AST]:
    """Public function and class definitions of a body, sorted by name; for a name defined twice
    (a property's getter and setter) the first definition with a docstring."""
    chosen: dict[str, ast.AST] = {}
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") and not (methods and node.name == "__init__"):
            continue
        if node.name not in chosen or ast.get_docstring(chosen[node.name]) is None:
            chosen[node.name] = node
    return [chosen[name] for name in sorted(chosen)]


def _class_docstrings(cls: type) -> Iterator[str]:
    """A class's docstring, then its public methods' and properties' own docstrings (not inherited)."""
    yield inspect.cleandoc(cls.__doc__ or "")
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_") and name != "__init__":
            continue
        if inspect.isroutine(member) or isinstance(member, (classmethod, staticmethod, property)):
            yield inspect.cleandoc(member.__doc__ or "")


def prose_sentences(text: str) -> list[str]:
    """The sentences of a block that read as English prose (code, grammar and tables dropped)."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        if not paragraph.strip() or _NOT_PROSE.search(paragraph):
            continue
        lines = textwrap.dedent(paragraph).splitlines()
        joined = _FOOTNOTE.sub("", " ".join(_LIST_MARKER.sub("", line).strip() for line in lines))
        pieces: list[str] = []
        for piece in _SENTENCE_END.split(joined):
            if pieces and _ABBREVIATION.search(pieces[-1]):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        sentences.extend(" ".join(piece.split()) for piece in pieces if _is_prose(piece))
    return sentences


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_SENTENCE_WORDS <= len(words) <= MAX_SENTENCE_WORDS:
        return False
    if not (sentence[0].isupper() or sentence[0] in '"“'):
        return False
    if not sentence.rstrip('"”)').endswith((".", "!", "?")):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    return letters >= 0.7 * len(sentence)


def passages(units: Iterator[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Group each block's sentences into passages of ``MIN_PASSAGE_WORDS``-``MAX_PASSAGE_WORDS`` words.

    A sentence seen earlier anywhere is dropped: pydoc topics repeat each other (``specialnames``
    contains ``customization``) and docstrings are shared between aliases, and a repeated sentence
    would put the same text in both splits or make a negative contain the query.
    """
    seen: set[str] = set()
    result: list[tuple[str, list[str]]] = []
    for document, text in units:
        current: list[str] = []
        words = 0
        for sentence in prose_sentences(text):
            key = sentence.lower()
            if key in seen:
                continue
            seen.add(key)
            length = len(sentence.split())
            if current and words + length > MAX_PASSAGE_WORDS:
                _close(document, current, words, result)
                current, words = [], 0
            current.append(sentence)
            words += length
            if words >= MIN_PASSAGE_WORDS and len(current) >= MIN_PASSAGE_SENTENCES:
                result.append((document, current))
                current, words = [], 0
        _close(document, current, words, result)
    return result


def _close(document: str, sentences: list[str], words: int, result: list[tuple[str, list[str]]]) -> None:
    if words >= MIN_PASSAGE_WORDS and len(sentences) >= MIN_PASSAGE_SENTENCES:
        result.append((document, sentences))


def cloze_examples(grouped: list[tuple[str, list[str]]], rng: random.Random) -> list[Example]:
    """One example per passage: a random sentence is the query, the rest of the passage the positive.

    The query must have ``MIN_QUERY_WORDS`` words and leave ``MIN_POSITIVE_WORDS`` for the positive.
    """
    examples = []
    for document, sentences in grouped:
        total = sum(len(s.split()) for s in sentences)
        candidates = [
            i
            for i, s in enumerate(sentences)
            if len(s.split()) >= MIN_QUERY_WORDS
            and total - len(s.split()) >= MIN_POSITIVE_WORDS
            and s not in _rest(sentences, i)
        ]
        if not candidates:
            continue
        chosen = rng.choice(candidates)
        examples.append(Example(document, sentences[chosen], _rest(sentences, chosen)))
    return examples


def _rest(sentences: list[str], left_out: int) -> str:
    return " ".join(s for i, s in enumerate(sentences) if i != left_out)


def split_by_document(examples: list[Example], rng: random.Random) -> dict[str, list[Example]]:
    """Assign whole documents to test, in a seeded random order, until it holds ``TEST_FRACTION``."""
    sizes = Counter(example.document for example in examples)
    order = sorted(sizes)
    rng.shuffle(order)
    test_documents: set[str] = set()
    test_size = 0
    for document in order:
        if test_size >= TEST_FRACTION * len(examples):
            break
        test_documents.add(document)
        test_size += sizes[document]
    return {
        "train": [e for e in examples if e.document not in test_documents],
        "test": [e for e in examples if e.document in test_documents],
    }


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed list of texts, scored one query at a time with numpy postings."""

    def __init__(self, texts: list[str], k1: float = BM25_K1, b: float = BM25_B) -> None:
        counts = [Counter(tokens(text)) for text in texts]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        norm = k1 * (1.0 - b + b * lengths / lengths.mean())
        postings: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        for index, count in enumerate(counts):
            for term, tf in count.items():
                ids, weights = postings[term]
                ids.append(index)
                weights.append(tf * (k1 + 1.0) / (tf + norm[index]))
        n = len(texts)
        self.size = n
        self.postings = {
            term: (np.array(ids), np.array(weights) * _idf(n, len(ids))) for term, (ids, weights) in postings.items()
        }

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every text for ``query`` (each distinct query term counted once)."""
        result = np.zeros(self.size)
        for term in sorted(set(tokens(query))):
            if term in self.postings:
                ids, weights = self.postings[term]
                result[ids] += weights
        return result


def _idf(num_texts: int, document_frequency: int) -> float:
    """Lucene's BM25 idf, never negative."""
    return math.log(1.0 + (num_texts - document_frequency + 0.5) / (document_frequency + 0.5))


def with_hard_negatives(examples: list[Example]) -> list[dict[str, str]]:
    """Rows with the ``NUM_NEGATIVES`` best BM25 positives of other documents as negatives.

    A candidate that contains the query verbatim (a docstring sentence repeated inside a longer,
    unsplit sentence elsewhere) is passed over. An example with fewer than ``NUM_NEGATIVES``
    candidates sharing a term with its query is dropped.
    """
    index = BM25([e.positive for e in examples])
    documents = np.array([e.document for e in examples])
    rows = []
    for example in examples:
        scores = index.scores(example.query)
        scores[documents == example.document] = -np.inf
        ranked = (i for i in np.argsort(-scores, kind="stable") if scores[i] > 0)
        usable = (i for i in ranked if example.query not in examples[i].positive)
        best = list(itertools.islice(usable, NUM_NEGATIVES))
        if len(best) < NUM_NEGATIVES:
            continue
        row = {"question": example.query, "positive_context": example.positive}
        row.update({f"negative_context_{k}": examples[i].positive for k, i in enumerate(best)})
        row["document"] = example.document
        rows.append(row)
    return rows


def build_rows() -> dict[str, list[dict[str, str]]]:
    """The demo set in memory: ``{"train": rows, "test": rows}``, rows with keys ``COLUMNS``."""
    rng = random.Random(SEED)
    examples = cloze_examples(passages(source_units()), rng)
    return {split: with_hard_negatives(part) for split, part in split_by_document(examples, rng).items()}


def python_version() -> str:
    return "{}.{}.{}".format(*sys.version_info[:3])


def encode(rows: list[dict[str, str]]) -> bytes:
    """Gzipped JSON lines, byte-stable for a given zlib (no timestamp or file name in the header)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def main() -> None:
    rows = build_rows()
    for split, path in SPLIT_FILES.items():
        data = encode(rows[split])
        atomic_write(path, lambda temporary, data=data: temporary.write_bytes(data))
    stamp = (
        '"""The shipped offline demo probe set (see docs/demo-data.md); generated by scripts/build_demo_set.py."""\n\n'
        f'BUILT_WITH_PYTHON = "{python_version()}"\n'
    )
    atomic_write_text(DEMO_DIR / "__init__.py", stamp)
    for split, path in SPLIT_FILES.items():
        unique = {row[c] for row in rows[split] for c in COLUMNS[1:6]}
        print(f"{split}: {len(rows[split])} examples, {len(unique)} unique passages, {path.stat().st_size} bytes")
    print(f"built with Python {python_version()}")


if __name__ == "__main__":
    main()
