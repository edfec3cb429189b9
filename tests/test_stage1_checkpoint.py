"""The data position of a Stage 1 checkpoint: sequence keys, and the stream without the
sequences a checkpoint counted (no Ray: the pieces the resume tests rely on)."""

import numpy as np

from dba_ray.data.tokenize import sequence_keys
from dba_ray.stage1_checkpoint import unseen


def _stream(rows: int, batch_size: int) -> list[dict]:
    """``rows`` sequences (row i holds i) in micro-batches of ``batch_size``, last short."""
    keys = np.arange(rows, dtype=np.int64) * 7 + 3
    ids = np.repeat(np.arange(rows, dtype=np.int32)[:, None], 5, axis=1)
    return [{"input_ids": ids[i : i + batch_size], "key": keys[i : i + batch_size]} for i in range(0, rows, batch_size)]


def test_after_a_counted_prefix_the_micro_batches_are_the_uninterrupted_ones():
    whole = _stream(23, 4)
    counted = np.sort(np.concatenate([b["key"] for b in whole[:3]]))
    got = list(unseen(iter(whole), counted, 4))
    assert len(got) == len(whole) - 3
    for a, b in zip(got, whole[3:]):
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["key"], b["key"])


def test_scattered_counted_rows_are_dropped_and_the_rest_recut_in_order():
    # Two workers had counted blocks here and there: every row not counted comes out
    # once, in stream order, in micro-batches of 4 (the last one short).
    whole = _stream(30, 4)
    keys = np.concatenate([b["key"] for b in whole])
    counted = np.sort(keys[[0, 1, 2, 9, 10, 11, 12, 13, 29]])
    got = list(unseen(iter(whole), counted, 4))
    left = [k for k in keys.tolist() if k not in set(counted.tolist())]
    assert [len(b["key"]) for b in got] == [4, 4, 4, 4, 4, 1]
    assert np.concatenate([b["key"] for b in got]).tolist() == left
    assert np.concatenate([b["input_ids"][:, 0] for b in got]).tolist() == [(k - 3) // 7 for k in left]


def test_sequence_keys_name_each_sequence_by_its_records_and_place():
    batch = {"text": np.array(["same text", "same text"]), "_source": np.array(["a.jsonl:1", "a.jsonl:2"])}
    keys = sequence_keys(batch, 3)
    assert keys.dtype == np.int64 and len(set(keys.tolist())) == 3
    assert np.array_equal(keys, sequence_keys(dict(batch), 3))  # the same batch, the same names
    # The same text read from other lines of the file is other data: other names.
    moved = {"text": batch["text"], "_source": np.array(["a.jsonl:7", "a.jsonl:8"])}
    assert not set(sequence_keys(moved, 3).tolist()) & set(keys.tolist())
