"""The vocabulary warning's parts (dba_ray/vocab.py): which rows a domain touches. A
`dba` run's console with the warning, and the warning's counts on a real ĝ_G: the
console test (tests/test_console.py)."""

import numpy as np

from dba_ray.data.tokenize import IGNORE
from dba_ray.vocab import QUIET_BELOW, coverage_warning, touched_ids


def test_touched_ids_are_the_positions_that_feed_a_loss():
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    # Row 0: text then padding (7 is the last trained target, so 6 feeds it and 7 does
    # not); row 1: a prompt (9, 10) whose response (11, 12) is trained, then padding.
    labels = np.array([[5, 6, 7, IGNORE, IGNORE, IGNORE], [IGNORE, IGNORE, 11, 12, IGNORE, IGNORE]])
    assert touched_ids(ids, labels).tolist() == [5, 6, 9, 10, 11]


def test_warning_only_from_the_quiet_threshold_on():
    # 40 rows moved; the domain leaves QUIET_BELOW of them untouched (a line), or one fewer (none).
    moved = np.zeros(100, dtype=bool)
    moved[:40] = True
    at = round(QUIET_BELOW * 40)
    line = coverage_warning("dba", moved, 100, np.arange(at, 100))
    assert line is not None and line.startswith(f"dba: {at} of the 40 input-embedding rows ĝ_G moves ({at / 40:.1%})")
    assert coverage_warning("dba", moved, 100, np.arange(at - 1, 100)) is None
    # An SVD-compressed ĝ_G (moved None): every row of the vocabulary counts as moved.
    assert coverage_warning("dba", None, 100, np.arange(50)).startswith("dba: 50 of the 100 ")
