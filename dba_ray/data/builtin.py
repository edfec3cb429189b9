"""Corpora built from what ships with Python, for the offline quickstart and tests.

``builtin:python-docs`` (general) is the docstrings of a fixed list of standard-library
modules (modules, their public classes and functions): English prose about programming.
``builtin:python-code`` (a domain) is the code of other standard-library modules with
docstrings and comments removed. Both are made on the driver with no download; their
exact text depends on the Python version. ``:train`` / ``:eval`` select a split.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect

from dba_ray.errors import UserError

PREFIX = "builtin:"

_GENERAL_MODULES = (
    "abc argparse array ast asyncio base64 bisect bz2 calendar cmd codecs collections "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob gzip "
    "hashlib heapq hmac html imaplib inspect io ipaddress itertools json keyword "
    "linecache locale logging lzma mailbox math mimetypes numbers operator optparse os "
    "pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re "
    "reprlib sched secrets selectors shelve shlex shutil signal smtplib socket "
    "socketserver sqlite3 statistics string struct subprocess symtable tarfile tempfile "
    "textwrap threading time timeit tokenize trace traceback types typing unittest uuid "
    "warnings wave weakref xml zipfile zlib"
).split()

# Code, with docstrings and comments removed (so none of the general corpus's prose is
# in it, although many of these modules' docstrings are): a domain as far from English
# prose as a small corpus can be.
_CODE_MODULES = (
    "json.decoder json.encoder csv configparser shlex textwrap difflib heapq bisect "
    "fractions statistics string ipaddress calendar colorsys fnmatch glob graphlib "
    "html.parser http.cookies netrc pprint quopri sched tomllib uu zipapp"
).split()


def _code(module_name: str) -> list[str]:
    try:
        mod = importlib.import_module(module_name)
        tree = ast.parse(inspect.getsource(mod))
    except (ImportError, OSError, TypeError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        for sub in ast.walk(node):
            body = getattr(sub, "body", None)
            if (
                isinstance(sub, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                sub.body = body[1:] or [ast.Pass()]
        out.append(ast.unparse(node))
    return out


def _docs(module_name: str) -> list[str]:
    try:
        mod = importlib.import_module(module_name)
    except ImportError:  # a module missing from this Python build is simply absent
        return []
    out = [mod.__doc__ or ""]
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append(obj.__doc__ or "")
    return [inspect.cleandoc(d) for d in out if d and len(d.strip()) > 40]


CORPORA = {"python-docs": (_GENERAL_MODULES, _docs), "python-code": (_CODE_MODULES, _code)}


def _in_eval_split(text: str) -> bool:
    """The split rule of the project's shared data: about one record in ten."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 10 == 0


def builtin_records(name: str, text_field: str = "text") -> list[dict]:
    """Records of a builtin corpus, each {text_field: text, "_source": where}.

    ``builtin:NAME`` is the whole corpus; ``builtin:NAME:train`` / ``:eval`` its splits.
    """
    key, _, split = name.removeprefix(PREFIX).partition(":")
    if key not in CORPORA or split not in ("", "train", "eval"):
        known = ", ".join(f"builtin:{k}[:train|:eval]" for k in CORPORA)
        raise UserError(f"unknown builtin corpus {name!r} (known: {known})")
    modules, extract = CORPORA[key]
    records = [{text_field: text, "_source": f"{name}:{mod}"} for mod in modules for text in extract(mod)]
    if split:
        records = [r for r in records if _in_eval_split(r[text_field]) == (split == "eval")]
    return records
