"""Evaluation metrics on a tiny model, against direct computations (no Ray)."""

import math

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from dba_ray.config import DataConfig, ModelConfig
from dba_ray.data.records import read_choice_records, read_text_records
from dba_ray.data.tokenize import choice_arrays, record_arrays
from dba_ray.errors import UserError
from dba_ray.evaluate import choice_sums, scores, set_metrics, set_sums, text_sums
from dba_ray.model import load_model
from dba_ray.tokenizer import byte_tokenizer

RECORDS = [
    {"question": "Is the sky blue?", "choices": ["yes", "no", "maybe"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 2},
]


def test_choice_accuracy_matches_direct_log_likelihoods(tmp_path):
    model = load_model(ModelConfig())
    tok = byte_tokenizer()
    arrays = choice_arrays(RECORDS, tok, seq_len=48)
    assert len(arrays["input_ids"]) == 9 and arrays["group"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    expected = 0
    for rec in RECORDS:
        lls = []
        for choice in rec["choices"]:
            prompt = tok(f"{rec['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
            cont = tok(f" {choice}", add_special_tokens=False)["input_ids"]
            x = torch.tensor([prompt + cont])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            lls.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)))
        expected += int(np.argmax(lls) == rec["answer"])
    sums = choice_sums(model, arrays, batch_size=4, device="cpu")
    assert sums.tolist() == [expected, 3]
    # Two ranks split the records and add up to the same.
    halves = choice_sums(model, arrays, 4, "cpu", 0, 2) + choice_sums(model, arrays, 4, "cpu", 1, 2)
    assert halves.tolist() == [expected, 3]
    assert set_metrics(sums) == {"acc": expected / 3}


def test_text_metrics_match_the_model_loss():
    model = load_model(ModelConfig())
    ids = np.random.default_rng(0).integers(6, 262, (5, 20)).astype(np.int32)
    labels = ids.copy()
    labels[:, 15:] = -100
    sums = text_sums(model, ids, labels, batch_size=2, device="cpu")
    m = set_metrics(sums)
    x, y = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    with torch.no_grad():
        loss = float(model(input_ids=x, labels=y).loss)
    assert m["nll"] == pytest.approx(loss, rel=1e-5) and m["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert sums[2] == 5 * 14 and 0 <= m["acc"] <= 1


def test_scores_are_means_and_harmonic_mean():
    s = scores(
        {"a": {"acc": 0.2}, "b": {"acc": 0.4}, "g": {"acc": 0.6}}, {"a": "domain", "b": "domain", "g": "general"}
    )
    assert s["S_D"] == pytest.approx(0.3) and s["S_G"] == 0.6
    assert s["S"] == pytest.approx(2 * 0.3 * 0.6 / 0.9)


def test_malformed_choice_record_is_named(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [RECORDS[0], {"question": "q", "choices": ["a"], "answer": 0}])
    with pytest.raises(UserError, match=r"mc.jsonl:2: field 'choices' must be a list of at least 2"):
        read_choice_records(DataConfig(path=path))
    path = write_jsonl(tmp_path / "mc2.jsonl", [{**RECORDS[1], "answer": 5}])
    with pytest.raises(UserError, match="mc2.jsonl:1: field 'answer'"):
        read_choice_records(DataConfig(path=path))
    assert read_choice_records(DataConfig(path=write_jsonl(tmp_path / "ok.jsonl", RECORDS))) == RECORDS


def test_per_record_sums_score_each_record_alone(tmp_path):
    """A per_record set: each record tokenized alone with EOS and cut into seq_len
    pieces; its sums equal scoring that record by itself, and two ranks add up to one."""
    texts = ["short one", "a record longer than one piece of sixteen tokens", "third"]
    write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in texts])
    assert read_text_records(DataConfig(path=str(tmp_path / "s.jsonl"))) == texts
    model, tok = load_model(ModelConfig()), byte_tokenizer()
    arrays = record_arrays(texts, tok, seq_len=16)
    pieces = [-(-(len(t.encode()) + 1) // 16) for t in texts]  # bytes + EOS, in 16-token pieces
    assert arrays["record"].tolist() == [r for r, n in enumerate(pieces) for _ in range(n)]
    sums = set_sums(model, arrays, 2, "cpu")
    assert sums.shape == (3, 3)
    for r in range(3):
        rows = arrays["record"] == r
        alone = text_sums(model, arrays["input_ids"][rows], arrays["labels"][rows], 8, "cpu")
        assert sums[r].tolist() == pytest.approx(alone.tolist(), rel=1e-6)
        assert sums[r, 2] == len(texts[r].encode()) + 1 - pieces[r]  # every token but each piece's first
    halves = set_sums(model, arrays, 2, "cpu", 0, 2) + set_sums(model, arrays, 2, "cpu", 1, 2)
    assert halves.flatten().tolist() == pytest.approx(sums.flatten().tolist(), rel=1e-6)
    m = set_metrics(sums)
    assert m["records"] == sums.tolist() and m["acc"] == pytest.approx(float(sums[:, 1].sum() / sums[:, 2].sum()))
