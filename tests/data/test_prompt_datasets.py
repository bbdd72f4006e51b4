"""Prompt datasets (data/prompts.py): the three formats, chat prompts, seeded resumable order,
and every bad input named."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.prompts import PromptDataError, PromptOrder, is_chat, load_rows, to_samples

ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1), "difficulty": i % 3} for i in range(7)]


def write_saved_dataset(path, rows):
    """What datasets' Dataset.save_to_disk writes: Arrow IPC stream files listed in state.json."""
    path.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text("{}")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_every_format_gives_the_same_rows(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    elif fmt == "parquet":
        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        path = tmp_path / "saved"
        write_saved_dataset(path, ROWS)
    samples = to_samples(load_rows(path))
    assert [(s.prompt, s.columns) for s in samples] == [(r["prompt"], {"answer": r["answer"], "difficulty": r["difficulty"]})
                                                        for r in ROWS]
    assert isinstance(samples[0].columns["difficulty"], int)


def test_chat_prompts_from_parquet_and_another_prompt_key(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}], "answer": "4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (s,) = to_samples(load_rows(tmp_path / "c.parquet"), prompt_key="messages")
    assert is_chat(s.prompt) and s.prompt[1] == {"role": "user", "content": "2+2="} and s.answer == "4"


def test_order_is_a_permutation_per_epoch_seeded_and_resumable():
    samples = to_samples(ROWS)
    order = PromptOrder(samples, seed=3)
    epoch0 = [s.prompt for s in order.next(7)]
    assert sorted(epoch0) == sorted(r["prompt"] for r in ROWS)
    expected = [ROWS[i]["prompt"] for i in np.random.default_rng([3, 0]).permutation(7)]
    assert epoch0 == expected  # the documented order: numpy rng([seed, epoch])
    order.next(2)
    state = order.state_dict()
    rest = [s.prompt for s in order.next(9)]
    resumed = PromptOrder(samples, seed=3)
    resumed.load_state_dict(state)
    assert [s.prompt for s in resumed.next(9)] == rest
    assert state == {"epoch": 1, "index": 2}
    assert [s.prompt for s in PromptOrder(samples, shuffle=False).next(3)] == ["0+1=", "1+1=", "2+1="]


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("", "holds no rows"),
    ('{"question": "a"}\n', "row 0 has no column 'prompt' (task.prompt_key); its columns are ['question']"),
    ('{"prompt": 3}\n', "must be a string or a list of {role, content} messages"),
    ('{"prompt": [{"role": "user"}]}\n', "must be a string or a list"),
    ('{"prompt": "a"}\n{oops\n', "line 2: not valid JSON"),
])
def test_bad_datasets_are_named(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptDataError, match="task.path") as e:
        to_samples(load_rows(path, "task.path"), "prompt", "task.path")
    assert needle in str(e.value)


def test_bad_directories_and_suffixes_are_named(tmp_path):
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(PromptDataError, match="is a DatasetDict; point at one split"):
        load_rows(tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PromptDataError, match="state.json is missing"):
        load_rows(tmp_path / "plain")
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(PromptDataError, match="expected a .jsonl or .parquet file"):
        load_rows(tmp_path / "p.csv")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(PromptDataError, match="not a readable Parquet file"):
        load_rows(tmp_path / "x.parquet")


def test_chat_rendering_for_the_byte_tokenizer_and_a_tokenizer_without_template():
    from models.tokenizer import ByteTokenizer
    from rollout.batch import ChatTemplateError, prompt_token_ids, render_plain_chat

    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "2+2="}]
    assert render_plain_chat(messages) == "<|user|>\n2+2=\n<|assistant|>\n"
    assert prompt_token_ids(messages, tok) == [tok.bos_id] + list("<|user|>\n2+2=\n<|assistant|>\n".encode())
    assert prompt_token_ids("2+2=", tok) == [tok.bos_id] + list(b"2+2=")

    class NoTemplate:
        has_chat_template = False
        bos_id = 0

        def encode(self, text):
            return [1]

    with pytest.raises(ChatTemplateError, match="has no chat template"):
        prompt_token_ids(messages, NoTemplate())


def test_chat_messages_go_through_an_hf_tokenizers_template(tmp_path):
    from hf_fixtures import TINY_VOCAB, save_tiny_tokenizer
    from models.hf_tokenizer import load_tokenizer
    from rollout.batch import ChatTemplateError, prompt_token_ids

    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2="}]
    save_tiny_tokenizer(tmp_path / "chat", chat_template=True)
    tok = load_tokenizer(tmp_path / "chat", TINY_VOCAB)
    expected = tok.hf.encode("<|im_start|>system\nadd<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n"
                             "<|im_start|>assistant\n", add_special_tokens=False)  # the fixture's template by hand
    assert prompt_token_ids(messages, tok) == expected
    save_tiny_tokenizer(tmp_path / "plain", chat_template=False)
    with pytest.raises(ChatTemplateError, match="HFTokenizer"):
        prompt_token_ids(messages, load_tokenizer(tmp_path / "plain", TINY_VOCAB))
