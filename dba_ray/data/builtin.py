"""Corpora built from what ships with Python, for the offline quickstart and tests.

``builtin:python-docs`` is the docstrings of a fixed list of standard-library modules
(modules, their public classes and functions): real English prose about programming,
generated on the driver with no download. Its exact text depends on the Python version.
"""

from __future__ import annotations

import importlib
import inspect

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

CORPORA = {"python-docs": _GENERAL_MODULES}


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


def builtin_records(name: str, text_field: str = "text") -> list[dict]:
    """Records of a builtin corpus, each {text_field: docstring, "_source": where}."""
    from dba_ray.errors import UserError

    key = name.removeprefix(PREFIX)
    if key not in CORPORA:
        raise UserError(f"unknown builtin corpus {name!r} (known: {', '.join(CORPORA)})")
    return [
        {text_field: doc, "_source": f"{name}:{mod}"}
        for mod in CORPORA[key]
        for doc in _docs(mod)
    ]
