"""Preference pairs from JSONL (train/data/preference.py): formats, masks, soft labels, errors, counts."""
import json
import logging

import numpy as np
import pytest

from train import data

BYTE = data.ByteTokenizer()


def write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def config(paths, **kw):
    c = data.default_config()
    c.update(source="preference", paths=paths, prefetch=0, **kw)
    return c


def test_string_and_chat_records_batch_with_prompt_masked_and_soft_labels(tmp_path):
    chat = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+3?"}]
    rows = [
        {"prompt": "Q:2+3\nA:", "chosen": "5", "rejected": "6", "label": 0.75},
        "",
        {"chosen": chat + [{"role": "assistant", "content": "5"}], "rejected": chat + [{"role": "assistant",
                                                                                       "content": "six"}]},
        {"prompt": chat, "chosen": {"role": "assistant", "content": "5"}, "rejected": "6\n"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},  # dropped, counted
    ]
    path = write(tmp_path, rows)
    records = data.read_preference_jsonl([path])
    prompt = "<|system|>\nBe exact.\n<|user|>\n2+3?\n<|assistant|>\n"
    assert records[1][:4] == (prompt, "5\n", "six\n", 1.0) and records[2][:3] == (prompt, "5\n", "6\n")
    assert records[0].label == 0.75 and records[0].where == f"{path}, line 1" and records[1].where.endswith("line 3")
    kept, counts = data.fit_records(records, BYTE, 64)
    assert len(kept) == 3 and counts == {"cut": 0, "dropped": 1}
    for packing in (False, True):
        batch = next(iter(data.make_dataset(config([path], eval_paths=[path], packing=packing), tokenizer=BYTE,
                                            seq_len=64, batch_size=4, split="eval")))
        assert set(batch) == set(data.batch_keys(config([path]))) and batch["label"].dtype == np.float32
        texts = {}
        for side in ("chosen", "rejected"):
            for r in range(4):
                for s in np.unique(batch[side + "_segment_ids"][r][batch[side + "_segment_ids"][r] > 0]):
                    where = batch[side + "_segment_ids"][r] == s
                    trained = batch[side + "_targets"][r][where][batch[side + "_loss_mask"][r][where] == 1]
                    label = batch["label"][r][batch["chosen_segment_ids"][r] == s]
                    assert np.all(label == label[0])
                    texts.setdefault(side, []).append((BYTE.decode(trained), float(label[0])))
        # The loss mask covers exactly the response and eos; each pair keeps its label.
        assert sorted(texts["chosen"]) == [("5", 0.75), ("5\n", 1.0), ("5\n", 1.0)]
        assert sorted(texts["rejected"]) == [("6", 0.75), ("6\n", 1.0), ("six\n", 1.0)]
        if not packing:
            assert np.all(batch["chosen_segment_ids"].max(axis=1)[:3] == 1) and not batch["chosen_loss_mask"][3].any()


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "", "rejected": "x"}, "line 2: the 'chosen' response is empty"),
    ({"prompt": "p", "chosen": "x", "rejected": "  "}, "line 2: the 'rejected' response is empty"),
    ({"prompt": "p", "chosen": "x"}, "line 2: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "label": 1.5}, "line 2: field 'label' is 1.5"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "line 2: without 'prompt'"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": "x", "rejected": "y"}, "field 'prompt' must be"),
    ("{not json", "line 2: malformed JSON"),
])
def test_malformed_records_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path, [{"prompt": "p", "chosen": "x", "rejected": "y"}, row])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        data.read_preference_jsonl([path])
    assert path in str(e.value)


def test_lengths_prompts_too_long_truncation_and_reference_fields(tmp_path, caplog):
    path = write(tmp_path, [{"prompt": "p", "chosen": "ok", "rejected": "no"},
                            {"prompt": "x" * 40, "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=f"{path}, line 2: the prompt takes 40 tokens"):
        data.make_dataset(config([path]), tokenizer=BYTE, seq_len=32, batch_size=2)
    path = write(tmp_path, [{"prompt": "p", "chosen": "abcdefghij1", "rejected": "abcdefghij2"},
                            {"prompt": "q", "chosen": "long xnswer", "rejected": "long ynswer"}], "long.jsonl")
    with pytest.raises(ValueError, match="line 1: the pair needs 13 tokens, more than train.seq_len=12"):
        data.make_dataset(config([path]), tokenizer=BYTE, seq_len=12, batch_size=2)
    with caplog.at_level(logging.WARNING):
        kept, counts = data.fit_records(data.read_preference_jsonl([path]), BYTE, 12, truncate=True)
    assert counts == {"cut": 2, "dropped": 1} and [r.chosen for r in kept] == ["long xnswe"]  # cut equal: dropped
    assert "2 of 2 pairs cut to train.seq_len=12, 1 dropped" in caplog.text
    with pytest.raises(ValueError, match="line 1: missing field 'ref_chosen_logp'"):
        data.make_dataset(config([path], reference_logps=True), tokenizer=BYTE, seq_len=64, batch_size=2)
    ref = write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logp": -1.5,
                            "ref_rejected_logp": -2.5}], "ref.jsonl")
    batch = next(iter(data.make_dataset(config([ref], reference_logps=True, packing=False), tokenizer=BYTE,
                                        seq_len=16, batch_size=2)))
    assert batch["chosen_ref_logp"][0, 0] == -1.5 and batch["rejected_ref_logp"][0, 0] == -2.5


def test_config_validation_of_the_preference_objectives():
    from experiments import orpo_arith, orpo_dpo
    from train.config import validate

    c = orpo_arith.get_config()
    c.train.objective = "dpo"
    with pytest.raises(ValueError, match="set data.source='preference' and data.reference_logps=True"):
        validate(c)
    validate(orpo_dpo.get_config())
    c = orpo_dpo.get_config()
    c.train.update(objective="preference_model", reward_token=259)
    with pytest.raises(ValueError, match=r"train.reward_token \(259\) is outside the vocabulary"):
        validate(c)
    c = orpo_arith.get_config()
    c.data.source = "arithmetic"
    with pytest.raises(ValueError, match="train.objective='orpo' reads the batch keys"):
        validate(c)
