"""The Ray Data pipeline on real files, on the session's local Ray cluster."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_docs, write_jsonl

from dba_ray.config import DataConfig, ModelConfig
from dba_ray.data import build_sequences, collect_arrays
from dba_ray.data.records import ReadFiles
from dba_ray.data.tokenize import IGNORE, instruction_prompt
from dba_ray.errors import UserError, find_user_error
from dba_ray.progress import Tracker
from dba_ray.tokenizer import byte_tokenizer

pytestmark = pytest.mark.usefixtures("ray_cluster")
MODEL = ModelConfig()
TOK = byte_tokenizer()


def rows(data_cfg, **kw):
    out = build_sequences(data_cfg, MODEL, **kw).take_all()
    return np.stack([r["input_ids"] for r in out]), np.stack([r["labels"] for r in out])


def collect_error(data_cfg, **kw) -> str:
    with pytest.raises(Exception) as e:
        build_sequences(data_cfg, MODEL, **kw).take_all()
    user = find_user_error(e.value)
    assert user is not None, f"not a user error: {e.value!r}"
    return str(user)


def test_text_is_packed_with_eos_between_documents(tmp_path):
    docs = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": "delta epsilon zeta"}]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    ids, labels = rows(DataConfig(path=path, seq_len=8))
    expected = []
    for d in docs:
        expected += TOK(d["text"], add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    flat = ids.reshape(-1)[: len(expected)]
    assert flat.tolist() == expected
    # Only the padding at the very end is excluded from the loss.
    assert (labels.reshape(-1)[: len(expected)] == flat).all()
    assert (labels.reshape(-1)[len(expected) :] == IGNORE).all()
    assert ids.shape[1] == 8


def test_instruction_prompt_is_masked(tmp_path):
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    path = write_jsonl(tmp_path / "i.jsonl", [rec])
    ids, labels = rows(DataConfig(path=path, format="instruction", seq_len=128))
    prompt = TOK(instruction_prompt(rec["instruction"], rec["input"]), add_special_tokens=False)["input_ids"]
    answer = TOK("5", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    n = len(prompt) + len(answer)
    assert ids[0, :n].tolist() == prompt + answer
    assert (labels[0, : len(prompt)] == IGNORE).all()
    assert labels[0, len(prompt) : n].tolist() == answer
    assert (labels[0, n:] == IGNORE).all()


def test_chat_trains_only_on_assistant_turns(tmp_path):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ids, labels = rows(DataConfig(path=path, format="chat", seq_len=128))
    trained = TOK.decode([t for t, lab in zip(ids[0], labels[0]) if lab != IGNORE])
    assert trained == "hello<|eos|>ciao<|eos|>"


def test_sources_jsonl_json_parquet_text_folder(tmp_path):
    docs = make_docs(12)
    folder = tmp_path / "mixed"
    write_jsonl(folder / "a.jsonl", docs[:3])
    (folder / "b.json").write_text(json.dumps(docs[3:6]))
    pq.write_table(pa.Table.from_pylist(docs[6:9]), folder / "c.parquet")
    (folder / "d.txt").write_text("\n".join(d["text"] for d in docs[9:]) + "\n")
    (folder / ".hidden.jsonl").write_text("not json\n")  # hidden files are ignored
    ids, labels = rows(DataConfig(path=str(folder), seq_len=16))
    n_tokens = sum(len(TOK(d["text"])["input_ids"]) + 1 for d in docs)
    assert int((ids != TOK.pad_token_id).sum()) == n_tokens
    assert int((labels != IGNORE).sum()) == n_tokens


def test_plain_text_paragraphs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first line\nstill first\n\nsecond para\n")
    ids, _ = rows(DataConfig(path=str(f), sample_by="paragraph", seq_len=64))
    text = TOK.decode([t for t in ids.reshape(-1) if t != TOK.pad_token_id])
    assert text == "first line\nstill first<|eos|>second para<|eos|>"


def test_hf_dataset_from_local_disk(tmp_path):
    import datasets

    docs = make_docs(5)
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "saved"))
    ids, _ = rows(DataConfig(hf_dataset=str(tmp_path / "saved"), seq_len=16))
    n_tokens = sum(len(TOK(d["text"])["input_ids"]) + 1 for d in docs)
    assert int((ids != TOK.pad_token_id).sum()) == n_tokens
    # A folder of data files goes through datasets.load_dataset (no hub involved).
    write_jsonl(tmp_path / "files" / "train.jsonl", docs)
    ids2, _ = rows(DataConfig(hf_dataset=str(tmp_path / "files"), seq_len=16))
    assert sorted(map(tuple, ids2)) == sorted(map(tuple, ids))


def test_budgets_and_deterministic_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(200))
    cfg = DataConfig(path=path, seq_len=16)
    ids, _ = rows(cfg, max_tokens=16 * 10)
    assert ids.shape == (10, 16)
    few, _ = rows(cfg, max_records=3)
    n_tokens = sum(len(TOK(d["text"])["input_ids"]) + 1 for d in make_docs(200)[:3])
    assert int((few != TOK.pad_token_id).sum()) == n_tokens
    shuffled = DataConfig(path=path, seq_len=16, shuffle_seed=7)
    a, _ = rows(shuffled, max_records=20)
    b, _ = rows(shuffled, max_records=20)
    plain, _ = rows(cfg, max_records=20)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, plain)
    # Capping the tokenizing tasks (ray.tokenize_concurrency) changes nothing but speed.
    capped, _ = rows(shuffled, max_records=20, concurrency=1)
    assert np.array_equal(capped, a)


def test_collected_rows_keep_source_order_whichever_task_finishes_first():
    """The tokenized data (pretraining's, the domain's) comes out in source order, so two
    runs train on the same batches: a Dataset copies the DataContext when it is made, and
    an order set on the current one afterwards never reached it (the quickstart's first
    pretraining loss differed between two runs)."""
    import ray.data

    def first_block_slow(batch: dict) -> dict:  # defined here: Ray's workers cannot import this module
        if batch["id"][0] == 0:
            time.sleep(2)
        ids = np.repeat(batch["id"][:, None], 4, axis=1).astype(np.int32)
        return {"input_ids": ids, "labels": ids}

    def blocks():
        return ray.data.range(4, override_num_blocks=4).map_batches(first_block_slow, batch_size=None)

    assert collect_arrays(blocks())["input_ids"][:, 0].tolist() == [0, 1, 2, 3]
    assert collect_arrays(blocks(), limit=2)["input_ids"][:, 0].tolist() == [0, 1]


def test_malformed_record_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"text": "fine"}])
    msg = collect_error(DataConfig(path=path, seq_len=16))
    assert f"{path}:2" in msg and "not valid JSON" in msg
    path = write_jsonl(tmp_path / "field.jsonl", [{"text": "ok"}, {"body": "x"}])
    msg = collect_error(DataConfig(path=path, seq_len=16))
    assert f"{path}:2" in msg and "field 'text' missing" in msg
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    msg = collect_error(DataConfig(path=path, format="chat", seq_len=16))
    assert f"{path}:1" in msg and "no assistant message" in msg


def test_skip_mode_counts_bad_records(tmp_path):
    import ray

    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"body": 1}, {"text": "fine"}])
    tracker = Tracker.remote()
    ids, _ = rows(DataConfig(path=path, seq_len=16, on_bad_record="skip"), tracker=tracker)
    text = TOK.decode([t for t in ids.reshape(-1) if t != TOK.pad_token_id])
    assert text == "ok<|eos|>fine<|eos|>"
    snap = ray.get(tracker.snapshot.remote())
    assert snap["skipped"] == 2 and f"{path}:2" in snap["first_skip"]


def test_empty_and_missing_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        build_sequences(DataConfig(path=str(tmp_path / "empty"), seq_len=16), MODEL)
    with pytest.raises(UserError, match="data path not found: .*nowhere"):
        build_sequences(DataConfig(path=str(tmp_path / "nowhere"), seq_len=16), MODEL)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="cannot tell the format of .*x.csv"):
        build_sequences(DataConfig(path=str(tmp_path / "x.csv"), seq_len=16), MODEL)
    with pytest.raises(UserError, match="unknown builtin corpus"):
        build_sequences(DataConfig(path="builtin:nope", seq_len=16), MODEL)


def test_malformed_hf_row_is_quoted(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "ok"}, {"text": None}]).save_to_disk(str(tmp_path / "s"))
    msg = collect_error(DataConfig(hf_dataset=str(tmp_path / "s"), seq_len=16))
    assert "malformed record in" in msg and '(record {"text": null})' in msg
    assert "field 'text' missing" in msg


def test_subset_splits_a_file_into_train_and_validation_by_hash(tmp_path):
    import hashlib

    docs = make_docs(200, seed=5)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    texts = {}
    for subset in ("all", "train", "validation"):
        cfg = DataConfig(path=path, subset=subset)
        texts[subset] = [t for batch in ReadFiles(cfg)({"file": [path], "fmt": ["jsonl"]}) for t in batch["text"]]
    rule = [d["text"] for d in docs if int(hashlib.sha256(d["text"].encode()).hexdigest()[8:16], 16) % 10 == 0]
    assert texts["validation"] == rule and 5 < len(rule) < 40
    # No record in both; together they are the whole file, in source order.
    assert not set(texts["train"]) & set(texts["validation"])
    assert sorted(texts["train"] + texts["validation"]) == sorted(texts["all"]) == sorted(d["text"] for d in docs)
