"""The third protocol's general corpus (PROTOCOL3.md §1), built from git snapshots.

    python benchmarks/quality/data3.py [--mirrors /work/.mirror] [--out /work/quality3-data/general3]

Every source is a bare git directory (what the `fetch` tool leaves under MIRRORS, as
``<owner>+<name>/repo``); files are read with ``git show <commit>:<path>``, so a rerun on
the same commits writes the same bytes. Writes OUT/{enc,books,code,math}.{validation,test}.jsonl,
OUT/train.jsonl (the train splits of enc, books and code) and OUT/README.md, which is the
committed benchmarks/quality/data3/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

WIKITEXT = ("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8", "word_language_model/data/wikitext-2")
CODE_REPO, MATH_REPO = "TheAlgorithms/Python", "HoTT/book"
# Gutenberg numbers in the protocol's order, then its reserves; the first BOOKS_USED usable ones are used.
BOOK_NUMBERS = [972, 9198, 3261, 16215, 14263, 14881, 15122, 16351, 17474, 20170, 20249, 18304, 52834, 17074]
BOOK_NUMBERS += [16595, 17997, 13272, 12200, 11563, 15141, 17645, 19368, 22089]
BOOKS_USED, MIN_BOOKS = 20, 12
MAX_BOOK_BYTES = 4 * 1024 * 1024
CODE_CHARS = (200, 100_000)
CODE_TRAIN_CAP = 3_000_000
MATH_MIN_CHARS, MATH_EXCLUDED = 20_000, {"macros.tex", "main.tex"}
TEST_MIN, VALIDATION_MIN = (3, 150_000), (2, 75_000)  # (documents, characters)
TEST_CAP, VALIDATION_CAP = 300_000, 150_000
RECORD_CHARS = 2_048
LICENCES = {
    "enc": "CC BY-SA 3.0 (WikiText-2, Merity et al. 2016; the repository's BSD-3-Clause covers its code)",
    "books": "public domain in the US (Project Gutenberg texts)",
    "code": "MIT (repository LICENSE.md)",
    "math": "CC BY-SA 3.0 (the HoTT book)",
}


@dataclass
class Doc:
    kind: str
    doc_id: str
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.doc_id.encode()).hexdigest()


@dataclass
class Source:
    repo: str
    commit: str
    paths: list[str]


class Mirror:
    """Bare git directories by repository name."""

    def __init__(self, root: Path):
        self.root = root

    def git_dir(self, repo: str) -> Path:
        base = self.root / repo.replace("/", "+") / "repo"
        return base / ".git" if (base / ".git").is_dir() else base

    def git(self, repo: str, *args: str) -> bytes:
        return subprocess.run(
            ["git", "--git-dir", str(self.git_dir(repo)), *args], check=True, capture_output=True
        ).stdout

    def head(self, repo: str) -> str:
        return self.git(repo, "rev-parse", "HEAD").decode().strip()

    def files(self, repo: str, commit: str) -> dict[str, int]:
        """Path -> size in bytes of every blob at ``commit`` that the snapshot holds (a
        mirror may list its largest files without their contents: size "BAD")."""
        out = {}
        for line in self.git(repo, "ls-tree", "-r", "-l", commit).decode().splitlines():
            meta, path = line.split("\t", 1)
            size = meta.split()[3]
            if size.isdigit():
                out[path] = int(size)
        return out

    def show(self, repo: str, commit: str, path: str, encodings: tuple[str, ...] = ("utf-8",)) -> str:
        raw = self.git(repo, "show", f"{commit}:{path}")
        for enc in encodings[:-1]:
            try:
                return raw.decode(enc)
            except UnicodeDecodeError:
                continue
        return raw.decode(encodings[-1])


# ---------------------------------------------------------------- documents by kind


def wikitext_docs(m: Mirror) -> tuple[list[Doc], Source]:
    """An article runs from a ` = Title = ` line (between empty lines) to the next; lines are stripped, empty
    ones dropped, sub-headings kept as lines, paragraphs joined by a line break."""
    repo, commit, folder = WIKITEXT
    paths = [f"{folder}/valid.txt", f"{folder}/test.txt"]
    title = re.compile(r"^= ([^=].*[^=]) =$")
    docs: list[Doc] = []
    for path in paths:
        lines = [x.strip() for x in m.show(repo, commit, path).splitlines()]
        for i, line in enumerate(lines):
            if not line:
                continue
            # A title stands between empty lines; a formula the release broke at " = " does not.
            alone = (i == 0 or not lines[i - 1]) and (i + 1 == len(lines) or not lines[i + 1])
            head = title.match(line) if alone else None
            if head:
                docs.append(Doc("enc", f"wikitext:{head.group(1).strip()}", line))
            elif docs:  # the files open with a title; nothing precedes the first
                docs[-1].text += "\n" + line
    return numbered(docs), Source(repo, commit, paths)


def numbered(docs: list[Doc]) -> list[Doc]:
    """Titles that repeat (WikiText's `<unk>` hides words, e.g. ` = <unk> = `) get
    `#1`, `#2`, ... in file order, so that every doc_id is unique."""
    ids = [d.doc_id for d in docs]
    seen: dict[str, int] = {}
    for d in docs:
        if ids.count(d.doc_id) > 1:
            seen[d.doc_id] = seen.get(d.doc_id, 0) + 1
            d.doc_id = f"{d.doc_id}#{seen[d.doc_id]}"
    return docs


def gutenberg_repo(m: Mirror, number: int) -> str | None:
    """The fetched GITenberg repository of book ``number``, if any."""
    found = sorted(m.root.glob(f"GITenberg+*_{number}"))
    return found[0].name.replace("+", "/", 1) if found else None


def book_docs(m: Mirror) -> tuple[list[Doc], list[Source]]:
    """The text between a book's `*** START OF` and `*** END OF` lines (some files have
    no space after the asterisks); its UTF-8 file
    (`<n>-0.txt`) when there is one, else `<n>.txt` (UTF-8, else Latin-1)."""
    docs, sources = [], []
    for number in BOOK_NUMBERS:
        repo = gutenberg_repo(m, number)
        if repo is None or len(docs) == BOOKS_USED:
            continue
        commit = m.head(repo)
        sizes = m.files(repo, commit)
        path = next((p for p in (f"{number}-0.txt", f"{number}.txt") if p in sizes), None)
        if path is None or sizes[path] >= MAX_BOOK_BYTES:
            continue
        lines = m.show(repo, commit, path, ("utf-8", "latin-1")).replace("\r\n", "\n").split("\n")
        start = next(i for i, x in enumerate(lines) if re.match(r"\*\*\* ?START OF", x))
        end = next(i for i, x in enumerate(lines) if re.match(r"\*\*\* ?END OF", x))
        text = "\n".join(x.rstrip() for x in lines[start + 1 : end]).strip()
        docs.append(Doc("books", f"gutenberg:{number}", text))
        sources.append(Source(repo, commit, [path]))
    if len(docs) < MIN_BOOKS:
        raise SystemExit(f"only {len(docs)} books available (< {MIN_BOOKS}): PROTOCOL3 wants an amendment first")
    return docs, sources


def code_docs(m: Mirror) -> tuple[list[Doc], Source]:
    commit = m.head(CODE_REPO)
    paths = sorted(p for p, size in m.files(CODE_REPO, commit).items() if p.endswith(".py") and size >= CODE_CHARS[0])
    docs = [Doc("code", f"code:{p}", m.show(CODE_REPO, commit, p, ("utf-8", "latin-1"))) for p in paths]
    docs = [d for d in docs if CODE_CHARS[0] <= len(d.text) <= CODE_CHARS[1]]
    return docs, Source(CODE_REPO, commit, [d.doc_id.removeprefix("code:") for d in docs])


def math_docs(m: Mirror) -> tuple[list[Doc], Source]:
    commit = m.head(MATH_REPO)
    paths = sorted(p for p in m.files(MATH_REPO, commit) if "/" not in p and p.endswith(".tex"))
    paths = [p for p in paths if p not in MATH_EXCLUDED]
    docs = [Doc("math", f"hott:{p}", m.show(MATH_REPO, commit, p)) for p in paths]
    docs = [d for d in docs if len(d.text) >= MATH_MIN_CHARS]
    return docs, Source(MATH_REPO, commit, [d.doc_id.removeprefix("hott:") for d in docs])


# ---------------------------------------------------------------- split, records, caps


def take(docs: list[Doc], minimum: tuple[int, int]) -> tuple[list[Doc], list[Doc]]:
    """The leading documents until both minimums (documents, characters) hold; the rest."""
    n = chars = 0
    while n < len(docs) and (n < minimum[0] or chars < minimum[1]):
        chars += len(docs[n].text)
        n += 1
    return docs[:n], docs[n:]


def split(kind: str, docs: list[Doc]) -> dict[str, list[Doc]]:
    """Documents sorted by sha256(doc_id): test, then validation, then train."""
    docs = sorted(docs, key=lambda d: d.key)
    test, rest = take(docs, TEST_MIN)
    validation, train = take(rest, VALIDATION_MIN)
    if kind == "math":  # unseen: its leftover documents are read by nothing
        train = []
    if kind == "code":
        kept, chars = [], 0
        for d in train:  # hash order, until the next file would pass the cap
            if chars + len(d.text) > CODE_TRAIN_CAP:
                break
            kept.append(d)
            chars += len(d.text)
        train = kept
    return {"test": test, "validation": validation, "train": train}


def cut(text: str, limit: int = RECORD_CHARS) -> list[str]:
    """Pieces of at most ``limit`` characters, each ending at the last line break before
    the limit (a longer line: at its last space, else at the limit)."""
    pieces = []
    while len(text) > limit:
        head = text[: limit + 1]
        at = head.rfind("\n")
        if at <= 0:
            at = head.rfind(" ")
        if at <= 0:
            at = limit
        pieces.append(text[:at].rstrip())
        text = text[at:].lstrip("\n ")
    if text.strip():
        pieces.append(text.rstrip())
    return [p for p in pieces if p.strip()]


def capped(docs: list[Doc], cap: int) -> list[dict]:
    """Records of ``docs`` under a character cap: every document keeps its leading
    records up to one shared budget b, the largest b whose total stays within the cap
    (a document shorter than b keeps all of it)."""
    pieces = [cut(d.text) for d in docs]

    def kept(b: int) -> list[list[str]]:
        out = []
        for ps in pieces:
            keep, used = [], 0
            for p in ps:
                if used + len(p) > b:
                    break
                keep.append(p)
                used += len(p)
            out.append(keep)
        return out

    def total(b: int) -> int:
        return sum(len(p) for ps in kept(b) for p in ps)

    low, high = 0, max(sum(len(p) for p in ps) for ps in pieces)
    while low < high:  # the largest b with total(b) <= cap
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total(mid) <= cap else (low, mid - 1)
    return [{"text": p, "doc": d.doc_id} for d, ps in zip(docs, kept(low)) for p in ps]


def write_jsonl(path: Path, records: list[dict]) -> dict:
    """Write records; their count, characters, bytes and sha256."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(data)
    chars = sum(len(r["text"]) for r in records)
    return {"file": path.name, "records": len(records), "chars": chars, "bytes": len(data), "sha256": _sha(data)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(m: Mirror, out: Path) -> tuple[list[dict], dict[str, dict], dict[str, list[Source]]]:
    """Every file of general3/; the files' stats, each kind's split documents, the sources."""
    enc, enc_src = wikitext_docs(m)
    books, book_src = book_docs(m)
    code, code_src = code_docs(m)
    math, math_src = math_docs(m)
    kinds = {"enc": enc, "books": books, "code": code, "math": math}
    sources = {"enc": [enc_src], "books": book_src, "code": [code_src], "math": [math_src]}
    out.mkdir(parents=True, exist_ok=True)
    files, splits, train = [], {}, []
    for kind, docs in kinds.items():
        parts = split(kind, docs)
        splits[kind] = {name: [d.doc_id for d in ds] for name, ds in parts.items()}
        splits[kind]["chars"] = {name: sum(len(d.text) for d in ds) for name, ds in parts.items()}
        files.append(write_jsonl(out / f"{kind}.test.jsonl", capped(parts["test"], TEST_CAP)))
        files.append(write_jsonl(out / f"{kind}.validation.jsonl", capped(parts["validation"], VALIDATION_CAP)))
        train += [{"text": d.text, "doc": d.doc_id, "kind": kind} for d in parts["train"]]
    random.Random(0).shuffle(train)
    files.append(write_jsonl(out / "train.jsonl", train))
    return files, splits, sources


# ---------------------------------------------------------------- README


def readme(files: list[dict], splits: dict[str, dict], sources: dict[str, list[Source]]) -> str:
    """The corpus README, in ../shared/data's style."""
    lines = [
        "# The third protocol's general corpus (general3/)",
        "",
        "Built by `benchmarks/quality/data3.py` from git snapshots fetched from public GitHub repositories",
        "(PROTOCOL3.md §1). The data files live in `../shared/data/general3/` or, where that folder is read-only,",
        "`/work/quality3-data/general3/`; they are not committed. JSON Lines, UTF-8, one record per line, each",
        "with `text` and `doc` (the document it came from); train.jsonl's records also have `kind`.",
        "",
        "| file | records | characters of `text` | bytes |",
        "|---|---:|---:|---:|",
        *(f"| general3/{f['file']} | {f['records']:,} | {f['chars']:,} | {f['bytes']:,} |" for f in files),
        "",
        "## Sources and licences",
        "",
    ]
    for kind, srcs in sources.items():
        lines.append(f"- **{kind}** ({LICENCES[kind]}):")
        for s in srcs:
            shown = ", ".join(f"`{p}`" for p in s.paths) if len(s.paths) <= 3 else f"{len(s.paths):,} files"
            lines.append(f"  - `{s.repo}` at commit `{s.commit}`: {shown}")
    lines += ["", *RULES, "", "## Documents by split", ""]
    lines += ["| kind | test docs | test chars | validation docs | validation chars | train docs | train chars |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    for kind, s in splits.items():
        c = s["chars"]
        row = [kind] + [f"{n:,}" for part in ("test", "validation", "train") for n in (len(s[part]), c[part])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for kind, s in splits.items():
        for part in ("test", "validation"):
            lines.append(f"- {kind} {part}: " + ", ".join(f"`{d}`" for d in s[part]))
    lines += ["", "## File checksums (sha256)", "", "```"]
    lines += [f"{f['sha256']}  general3/{f['file']}" for f in files] + ["```", ""]
    return "\n".join(lines)


RULES = [
    "## How records were made",
    "",
    "- **enc**: every line of WikiText-2's valid.txt, then test.txt (the tokenised release, not detokenised),",
    "  stripped; empty lines dropped. A document is an article, from a ` = Title = ` line that stands between",
    "  empty lines (a formula the release broke at ` = ` is not a title) to the next; its",
    "  title and sub-heading lines (`= = Section = =`) are kept as lines, paragraphs joined by a line break.",
    "  doc id `wikitext:<title>`; a title that occurs more than once (`<unk>` titles) gets `#1`, `#2`, ... in",
    "  file order.",
    "- **books**: the first 20 of the protocol's Gutenberg numbers that were fetched with a text file under",
    "  4 MiB; the file is `<n>-0.txt` (UTF-8) where it exists, else `<n>.txt` (UTF-8, else Latin-1). A document",
    "  is the text between the `*** START OF` and `*** END OF` lines (`***START OF` in some files), trailing",
    "  spaces removed, Gutenberg's hard",
    "  line wrapping kept. doc id `gutenberg:<n>`.",
    "- **code**: every `*.py` of TheAlgorithms/Python of 200 to 100,000 characters, one document per file.",
    "  doc id `code:<path>`.",
    "- **math**: the HoTT book's top-level `.tex` files of at least 20,000 characters, except `macros.tex` and",
    "  `main.tex`, one document per file. doc id `hott:<file>`.",
    "- **shakespeare** is `../shared/data/general/shakespeare.*`, unchanged (not rebuilt here).",
    "",
    "## Split rule",
    "",
    "Within each kind, documents are sorted by `sha256(doc_id)`. Test takes documents in that order until it",
    "holds at least 3 documents and 150,000 characters; validation the next until at least 2 documents and",
    "75,000 characters; train the rest (math: the rest is unused; code: train stops before the file that would",
    "take it past 3,000,000 characters). `train.jsonl` holds one record per train document of enc, books and",
    "code, shuffled with `random.Random(0)`. Validation and test documents are cut into records of at most",
    "2,048 characters, each ending at the last line break before the limit (a longer line: at its last space,",
    "else at the limit). Caps: 300,000 characters per test file, 150,000 per validation file: every document",
    "keeps its leading records up to one shared budget, the largest whose total stays within the cap; what a",
    "cap drops is read by nothing. math and shakespeare are unseen: nothing trains on them.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"), help="where fetched repositories are")
    ap.add_argument("--out", type=Path, default=Path("/work/quality3-data/general3"))
    args = ap.parse_args()
    files, splits, sources = build(Mirror(args.mirrors), args.out)
    text = readme(files, splits, sources)
    (args.out / "README.md").write_text(text)
    (Path(__file__).parent / "data3" / "README.md").write_text(text)
    for f in files:
        print(f"{f['file']}: {f['records']:,} records, {f['chars']:,} characters")


if __name__ == "__main__":
    main()
