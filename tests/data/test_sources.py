import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2m_jax.data.sources import DataError, DatasetSpec, load_rows, normalise_row, resolve


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def test_ultrachat_jsonl_as_chat_and_as_prompts(tmp_path, cache):
    rows = [{"prompt": "Q1", "prompt_id": "a", "messages": _msgs(("user", "Q1"), ("assistant", "A1"))},
            {"prompt": "Q2", "prompt_id": "b",
             "messages": _msgs(("user", "Q2"), ("assistant", "A2"), ("user", "Q3"), ("assistant", "A3"))}]
    path = _jsonl(tmp_path / "ultrachat.jsonl", rows)
    chat = load_rows(path, cache_dir=cache)
    assert chat == [{"messages": rows[0]["messages"]}, {"messages": rows[1]["messages"]}]
    assert load_rows(path, kind="prompt", cache_dir=cache) == [{"prompt": "Q1"}, {"prompt": "Q2"}]
    assert load_rows(path, kind="prompt", limit=1, cache_dir=cache) == [{"prompt": "Q1"}]


def test_sharegpt_conversations_parquet(tmp_path, cache):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}], "source": "x"}]
    got = load_rows(_parquet(tmp_path / "hermes.parquet", rows), cache_dir=cache)
    assert got == [{"messages": _msgs(("system", "S"), ("user", "Q"), ("assistant", "A"))}]


def test_ultrafeedback_binarized_preferences_parquet(tmp_path, cache):
    rows = [{"prompt": "P", "prompt_id": "1",
             "chosen": _msgs(("user", "P"), ("assistant", "good")),
             "rejected": _msgs(("user", "P"), ("assistant", "bad")),
             "messages": _msgs(("user", "P"), ("assistant", "good")),
             "score_chosen": 9.0, "score_rejected": 2.0}]
    path = _parquet(tmp_path / "uf.parquet", rows)
    assert load_rows(path, cache_dir=cache) == [
        {"prompt": _msgs(("user", "P")), "chosen": "good", "rejected": "bad"}]
    assert load_rows(path, kind="chat", cache_dir=cache) == [{"messages": rows[0]["messages"]}]


def test_string_answers_with_question_and_system():
    row = {"system": "Be kind.", "question": "Why?", "chosen": "Because.", "rejected": "No."}
    assert normalise_row(row, "preference") == {
        "prompt": _msgs(("system", "Be kind."), ("user", "Why?")), "chosen": "Because.", "rejected": "No."}


def test_genqa_text_messages():
    row = {"text": _msgs(("user", "q"), ("assistant", "a")), "prompt": "q"}
    assert normalise_row(row, "chat") == {"messages": _msgs(("user", "q"), ("assistant", "a"))}


def test_bad_row_in_file_names_dataset_row_and_field(tmp_path, cache):
    rows = [{"prompt": "fine"}, {"prompt": "also fine"}, {"question": "where is the prompt?"}]
    path = _jsonl(tmp_path / "seeds.jsonl", rows)
    with pytest.raises(DataError, match=r"seeds\.jsonl.*row 2: missing field 'prompt'.*\['question'\]"):
        load_rows(path, kind="prompt", cache_dir=cache)


@pytest.mark.parametrize("row, kind, match", [
    ({"conversations": [{"from": "alien", "value": "x"}]}, "chat", r"r9 field 'conversations'\[0\]: role 'alien'"),
    ({"messages": _msgs(("user", "only a question"))}, "chat", "no assistant turn"),
    ({"foo": 1}, "chat", "r9: missing field 'messages'"),
    ({"prompt": "   "}, "prompt", "r9: field 'prompt' is empty"),
    ({"prompt": "p", "chosen": "a"}, "preference", "r9: missing field 'rejected'"),
    ({"chosen": _msgs(("user", "p"), ("assistant", "a")), "rejected": _msgs(("user", "p"))}, "preference",
     "'rejected' must end with the assistant's answer"),
    ({"chosen": _msgs(("user", "p"), ("assistant", "a")), "rejected": _msgs(("user", "q"), ("assistant", "b"))},
     "preference", "answer different conversations"),
    ({"chosen": "a", "rejected": "b"}, "preference", "missing field 'prompt'"),
])
def test_bad_rows(row, kind, match):
    with pytest.raises(DataError, match=match):
        normalise_row(row, kind, where="r9")


def test_empty_dataset_raises(tmp_path, cache):
    schema = pa.schema([("prompt", pa.string())])
    path = _parquet(tmp_path / "empty.parquet", [], schema=schema)
    with pytest.raises(DataError, match=r"empty\.parquet.*has no rows"):
        load_rows(path, cache_dir=cache)


def test_presets_resolve_split_kinds():
    assert resolve("ultrafeedback_binarized:train_prefs") == DatasetSpec(
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None, "preference")
    assert resolve("ultrafeedback_binarized", split="train_gen").kind == "prompt"
    assert resolve("HuggingFaceH4/ultrachat_200k:train_sft").kind == "chat"
    assert resolve("infinity_instruct") == DatasetSpec("BAAI/Infinity-Instruct", "train", "7M", "chat")
    assert resolve("someone/else:dev") == DatasetSpec("someone/else", "dev", None, None)
    assert resolve(DatasetSpec("HuggingFaceH4/orca_dpo_pairs", "test_prefs")).kind == "preference"
    with pytest.raises(DataError, match="no split 'train'.*train_gen"):
        resolve("ultrachat_200k:train")
    with pytest.raises(DataError, match="single split 'train'"):
        resolve("local.jsonl", split="test")
    with pytest.raises(DataError, match="kind='sft'"):
        resolve("local.jsonl", kind="sft")


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
