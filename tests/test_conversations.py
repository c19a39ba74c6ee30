"""Conversations: messages / ShareGPT / Parquet records read with every odd case mapped or counted, rendered in four
real chat templates with exactly the assistant turns (+ their end-of-turn token) trained, truncated oldest-first,
and packed with the same loss and gradients as unpacked."""
from __future__ import annotations

import copy
import json
import tracemalloc

import pytest
import torch

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, add_lora
from lorakit.data.collate import pack, packed_batch, pad_batch, shared_prefix
from lorakit.data.conversations import ChatData, Conversation, Message, encode_conversations, heldout_reply
from lorakit.data.examples import IGNORE, EncodedExample
from lorakit.data.readers import LoadStats, iter_records
from lorakit.config.paths import embedded_data
from lorakit.errors import DataError

# The templates as their tokenizer_config.json files ship them (Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct,
# Mistral-7B-Instruct-v0.1), with the end-of-turn token each one closes an assistant turn with.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
          "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
         "assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) "
           "%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
           "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
SHAREGPT_LINES = 604540  # the line the shipped file is cut off on


@pytest.fixture(scope="module")
def smol_tok():
    from lorakit.models.loading import load_tokenizer, resolve_spec
    return load_tokenizer(resolve_spec("smollm2")[0])


def with_template(tok, name: str):
    """SmolLM2's tokenizer given another model's template and special tokens: (tokenizer, end-of-turn token)."""
    if name == "smollm2":
        return tok, "<|im_end|>"
    tok = copy.deepcopy(tok)
    if name == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens":
                                ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3
        return tok, "<|eot_id|>"
    if name == "mistral":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
        tok.chat_template = MISTRAL
        return tok, "</s>"
    tok.chat_template = QWEN2
    return tok, "<|im_end|>"


def conversation(turns: int, system: bool, untrained: int | None = None) -> Conversation:
    """`turns` exchanges of user and assistant text with punctuation, digits and newlines; the assistant turn
    numbered `untrained` has "train": false."""
    messages = [Message("system", "You answer briefly, in plain words.")] if system else []
    for k in range(turns):
        messages.append(Message("user", f"Question {k}: what is {k} + {k}? Explain.\nThanks!"))
        messages.append(Message("assistant", f"It is {2 * k}.\n\nBecause {k} and {k} make {2 * k} (see: arithmetic).",
                                train=k != untrained))
    return Conversation(messages, "test")


def trained_segments(tok, example: EncodedExample) -> list[str]:
    """The labelled tokens decoded, one string per contiguous run."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return [tok.decode(r) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("template", ["smollm2", "llama3", "qwen2", "mistral"])
@pytest.mark.parametrize("turns, system, untrained", [(1, False, None), (1, True, None), (3, False, None),
                                                      (3, True, 1), (6, True, None), (6, False, 0)])
def test_labels_are_exactly_the_assistant_turns_and_their_end_tokens(smol_tok, template, turns, system, untrained):
    tok, end = with_template(smol_tok, template)
    conv = conversation(turns, system, untrained)
    stats = LoadStats("test")
    [example] = encode_conversations([conv], tok, max_length=4096, stats=stats)
    want = [m.content + end for m in conv.messages if m.role == "assistant" and m.train]
    assert trained_segments(tok, example) == want
    assert stats.notes == ({"system prompt folded into the first user turn (the template has no system role)": 1}
                           if template == "mistral" and system else {})
    messages = conv.as_dicts()
    if template == "mistral" and system:  # the system prompt goes to the head of the first user turn
        messages = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}] + messages[2:]
    assert tok.decode(example.input_ids) == tok.apply_chat_template(messages, tokenize=False)  # the template's text
    [last] = encode_conversations([conv], tok, max_length=4096, train_on="last")
    assert trained_segments(tok, last) == want[-1:]


def test_a_tokenizer_without_a_template_gets_chatml_with_a_note(smol_tok):
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = None
    stats = LoadStats("test")
    [example] = encode_conversations([conversation(2, True)], tok, 4096, stats=stats)
    assert tok.decode(example.input_ids).startswith("<|im_start|>system\nYou answer briefly")
    assert trained_segments(tok, example) == [m.content + "<|im_end|>" for m in conversation(2, True).messages
                                              if m.role == "assistant"]
    assert any("no chat template: ChatML used" in note for note in stats.notes)


def test_truncation_drops_the_oldest_exchanges_and_keeps_the_system_prompt(smol_tok):
    conv = conversation(6, True)
    [whole] = encode_conversations([conv], smol_tok, 4096)
    stats = LoadStats("test")
    [short] = encode_conversations([conv], smol_tok, len(whole.input_ids) - 1, stats=stats)
    text = smol_tok.decode(short.input_ids)
    assert text.startswith("<|im_start|>system\nYou answer briefly") and "Question 0:" not in text
    assert all(f"Question {k}:" in text for k in range(1, 6))  # only the oldest exchange went
    assert trained_segments(smol_tok, short) == [m.content + "<|im_end|>" for m in conv.messages[3:]
                                                 if m.role == "assistant"]
    assert stats.notes == {"conversation shortened: oldest exchanges dropped to fit max_length": 1}
    [shorter] = encode_conversations([conv], smol_tok, len(short.input_ids) - 1)
    assert "Question 1:" not in smol_tok.decode(shorter.input_ids) and len(trained_segments(smol_tok, shorter)) == 4


def test_one_exchange_longer_than_max_length_is_cut_inside_the_reply_or_refused(smol_tok):
    conv = Conversation([Message("user", "Tell me a long story."), Message("assistant", "word " * 300)], "f.jsonl, line 7")
    stats = LoadStats("test")
    [cut] = encode_conversations([conv], smol_tok, 64, stats=stats)
    assert len(cut.input_ids) == 64 and trained_segments(smol_tok, cut)[0].startswith("word word")
    assert not trained_segments(smol_tok, cut)[0].endswith("<|im_end|>")
    assert stats.notes == {"conversation cut inside an assistant turn (one exchange longer than max_length)": 1}
    long_prompt = Conversation([Message("user", "tell " * 300), Message("assistant", "no")], "f.jsonl, line 9")
    with pytest.raises(DataError, match=r"f\.jsonl, line 9: its last user turn alone is longer than max_length"):
        encode_conversations([long_prompt], smol_tok, 64)
    stats = LoadStats("test")
    assert len(encode_conversations([long_prompt, conv], smol_tok, 64, stats=stats, strict=False)) == 1
    assert stats.skipped == {"prompt longer than max_length": 1}


def test_heldout_reply_is_the_last_turn_with_its_history(smol_tok):
    conv = conversation(3, True)
    prompt, history, reference = heldout_reply(smol_tok, conv, "chat", 4096)
    assert reference == conv.messages[-1].content and [m["role"] for m in history][-1] == "user"
    assert prompt.endswith("Question 2: what is 2 + 2? Explain.\nThanks!<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------- reading files

def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_messages_and_sharegpt_records_with_mapping_counted(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello", "train": False}, {"role": "user", "content": "bye"},
                      {"role": "assistant", "content": [{"type": "text", "text": "good"}, {"type": "text", "text": "bye"}]}]},
        {"conversations": [{"from": "gpt", "value": "(continued)"}, {"from": "human", "value": "q"},
                           {"from": "human", "value": "q2"}, {"from": "chatgpt", "value": "a"},
                           {"from": "bard", "value": ""}, {"from": "human", "value": "unanswered"}]},
    ]
    data = ChatData.load(write_jsonl(tmp_path / "c.jsonl", records))
    first, second = data.conversations
    assert [(m.role, m.content, m.train) for m in first.messages] == [
        ("system", "Be kind.", True), ("user", "hi", True), ("assistant", "hello", False), ("user", "bye", True),
        ("assistant", "goodbye", True)]
    assert [(m.role, m.content) for m in second.messages] == [("user", "q\n\nq2"), ("assistant", "a")]
    assert data.stats.notes == {"format messages": 1, "format sharegpt": 1, "role gpt -> assistant": 1,
                                "role human -> user": 3, "role chatgpt -> assistant": 1, "role bard -> assistant": 1,
                                "empty turn dropped": 1, "consecutive user turns merged": 1,
                                "leading assistant turn dropped (a conversation starts with the user)": 1,
                                "trailing user turn dropped (nothing answers it)": 1}
    array = tmp_path / "c.json"
    array.write_text(json.dumps(records, indent=1))
    again = ChatData.load(array)
    assert [c.messages for c in again.conversations] == [c.messages for c in data.conversations]


BAD_CHATS = {
    "unknown role": ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
                     r"c\.jsonl, line 2, messages\[1\]: field 'role': unknown role 'tool'", "unknown role 'tool'"),
    "content not text": ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]},
                         r"c\.jsonl, line 2, conversations\[0\]: field 'value' is int, not text", "non-text 'value'"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant",
                                                                                      "content": "b"}]},
                   r"messages\[0\]: field 'content', part 0 is of type 'image_url'", "non-text part in 'content'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "a"}]},
                          r"c\.jsonl, line 2: no assistant turn to train on", "no assistant turn to train on"),
    "nothing trained": ({"messages": [{"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "b", "train": False}]},
                        r"line 2: no assistant turn to train on", "no assistant turn to train on"),
    "no turns": ({"conversations": []}, r"c\.jsonl, line 2: no turns", "no turns"),
    "not a list": ({"messages": "hello"}, r"line 2: field 'messages' must be a list of turns, got str",
                   "'messages' not a list"),
    "no messages field": ({"text": "hello"}, r"line 2: missing field 'messages' \(or ShareGPT's 'conversations'\)",
                          "missing field 'messages'"),
    "train not boolean": ({"messages": [{"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "b", "train": "no"}]},
                          r"messages\[1\]: field 'train' must be true or false", "non-boolean 'train'"),
    "late system turn": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                       {"role": "assistant", "content": "b"}]},
                         r"line 2: a system turn after the first turn", "system turn after the start"),
}
GOOD = {"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "yes"}]}


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_bad_conversation_names_file_record_and_field_or_is_counted(case, tmp_path):
    record, message, reason = BAD_CHATS[case]
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, record, GOOD])
    with pytest.raises(DataError, match=message):
        ChatData.load(path)
    data = ChatData.load(path, strict=False)
    assert (data.stats.read, data.stats.kept, dict(data.stats.skipped)) == (3, 2, {reason: 1})


def test_a_template_that_fails_to_render_names_the_record(tmp_path, smol_tok):
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = "{% if messages | length > 2 %}{{ raise_exception('at most one exchange') }}{% endif %}" \
                        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    two = {"messages": GOOD["messages"] * 2}
    data = ChatData.load(write_jsonl(tmp_path / "c.jsonl", [GOOD, two]))
    with pytest.raises(DataError, match=r"c\.jsonl, line 2, field 'messages': the chat template failed to render "
                                        r"this conversation \(TemplateError: at most one exchange\)"):
        encode_conversations(data.conversations, tok, 512)
    stats = LoadStats("test")
    assert len(encode_conversations(data.conversations, tok, 512, stats=stats, strict=False)) == 1
    assert stats.skipped == {"template failed to render": 1}


def test_parquet_records_with_the_same_checks(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    rows = [GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, GOOD]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"chat\.parquet, row 1, messages\[1\]: field 'role': unknown role 'robot'"):
        ChatData.load(path)
    data = ChatData.load(path, strict=False)
    assert data.stats.kept == 2 and data.conversations[0].messages[1].content == "yes"
    from lorakit.data.classification import ClassificationData
    pq.write_table(pa.Table.from_pylist([{"text": "hello", "label": "ham"}, {"text": "WIN", "label": "spam"},
                                         {"text": "", "label": "ham"}]), tmp_path / "sms.parquet")
    with pytest.raises(DataError, match=r"sms\.parquet, row 2: field 'text' is empty"):
        ClassificationData.load(tmp_path / "sms.parquet")  # Parquet for every task, with the same record checks
    assert [e.label for e in ClassificationData.load(tmp_path / "sms.parquet", strict=False).examples] == [0, 1]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        ChatData.load(tmp_path / "bad.parquet")


def test_a_json_array_is_streamed_not_read_whole(tmp_path):
    record = {"conversations": [{"from": "human", "value": "x" * 2000}, {"from": "gpt", "value": "y" * 2000}]}
    path = tmp_path / "big.json"
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(record, indent=2) for _ in range(6000)) + "\n]\n")
    size = path.stat().st_size
    assert size > 24e6
    tracemalloc.start()
    count = sum(1 for _ in iter_records(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 6000 and peak < size / 4  # a few chunks, not the file (json.loads would need > size)


def test_json_array_errors_name_the_line_across_chunks(tmp_path, monkeypatch):
    import lorakit.data.readers
    monkeypatch.setattr(lorakit.data.readers, "CHUNK", 64)  # every record spans chunks; lines counted across the cuts
    lines = ["["] + [f'  {{"messages": [{{"role": "user", "content": "q{i}"}}, {{"role": "assistant", "content": "a"}}]}},'
                     for i in range(40)] + ['  {"messages": [}', "]"]
    (tmp_path / "a.json").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"a\.json, line 42: invalid JSON \(Expecting value at column 17\)"):
        list(iter_records(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text("\n".join(lines[:30]) + '\n  {"messages": [{"role": "us')
    assert sum(1 for _ in iter_records(tmp_path / "b.json", strict=False)) == 30
    with pytest.raises(DataError, match=r"b\.json, line 31: .*is the file truncated\? It ends inside record 29; "
                                        r"skip_invalid keeps the 29 complete records before it"):
        list(iter_records(tmp_path / "b.json"))


def test_the_real_sharegpt_file_keeps_every_complete_record():
    path = embedded_data("sharegpt")
    with pytest.raises(DataError, match=rf"line {SHAREGPT_LINES}: invalid JSON \(Unterminated string starting at "
                                        r"column 18\); is the file truncated\? It ends inside record 17671; skip_invalid keeps the "
                                        r"17,671 complete records"):
        for _ in iter_records(path):  # strict: every complete record comes, then the cut-off end is an error
            pass
    with pytest.raises(DataError, match=r"index 71: no turns \(use skip_invalid"):
        ChatData.load(path)
    data = ChatData.load(path, strict=False)
    s = data.stats
    assert s.read == 17672 and s.kept + sum(s.skipped.values()) == 17672  # every record kept or counted
    assert s.skipped == {"no assistant turn to train on": 155, "no turns": 126, "file cut off inside a record": 1}
    assert {k: s.notes[k] for k in ("role chatgpt -> assistant", "role bing -> assistant", "role bard -> assistant",
                                    "format sharegpt")} == {"role chatgpt -> assistant": 8, "role bing -> assistant": 4,
                                                            "role bard -> assistant": 2, "format sharegpt": 17390}
    assert s.notes["leading assistant turn dropped (a conversation starts with the user)"] == 6232
    assert all(c.messages[-1].role == "assistant" and c.messages[-1 if c.messages[0].role != "system" else 1].role
               for c in data.conversations)


# --------------------------------------------------------------------------------------------------- packing

def _tiny_ids(example: EncodedExample) -> EncodedExample:
    """SmolLM2 token ids folded into the tiny test model's 128-token vocabulary (the same on ids and labels)."""
    fold = [4 + t % 124 for t in example.input_ids]
    return EncodedExample(fold, [IGNORE if lab == IGNORE else f for lab, f in zip(example.labels, fold)])


def test_packed_chat_with_a_shared_system_prompt_gives_the_unpacked_loss_and_gradients(smol_tok):
    from lorakit.training.loss import causal_lm_loss
    convs = [Conversation([Message("system", "Be brief."), Message("user", f"q{k}?"), Message("assistant", f"a{k}.")]
                          + ([Message("user", "more"), Message("assistant", "done")] if k % 2 else []), "t")
             for k in range(5)]
    examples = [_tiny_ids(e) for e in encode_conversations(convs, smol_tok, 64)]
    rows = pack(examples, 60, share_prefix=True)
    system_tokens = len(smol_tok("<|im_start|>system\nBe brief.<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert len(rows) < len(examples) and all(shared_prefix(r) >= system_tokens for r in rows if len(r) > 1)
    model = TINY["llama"]()
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora(model)
    results = []
    for batch, loss_fn in ((pad_batch(examples, pad_id=0), lambda m, b: m(**b).loss),
                           (packed_batch(rows, pad_id=0, share_prefix=True), lambda m, b: m(**b).loss),
                           (packed_batch(rows, pad_id=0, share_prefix=True), causal_lm_loss)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_g), *others = results
    for loss, g in others:
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------- end to end (CLI)

def write_chats(path, n=30, seed=0) -> str:
    """ShareGPT records over the tiny models' w-words: a fixed system prompt, one to three exchanges."""
    import random
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(8, 120)}" for _ in range(k))  # noqa: E731
    records = []
    for i in range(n):
        turns = [{"from": "system", "value": "w5 w6 w7"}]
        for _ in range(1 + i % 3):
            question = words(3)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": f"{question} w4"}]
        records.append({"id": str(i), "conversations": turns})
    return write_jsonl(path, records)


def test_chat_train_eval_data_and_page(tmp_path, capsys):
    from conftest import save_tiny
    from test_train import recipe

    from lorakit.serve.page import ADAPTER_SLOTS, run_chat
    from lorakit.serve.workbench import BASE, Workbench
    from lorakit.cli import main
    from lorakit.inference.sampling import Sampling
    llama = str(save_tiny("llama", tmp_path / "llama"))
    data = write_chats(tmp_path / "chats.jsonl")
    r = recipe(tmp_path, model=llama, task="chat", data=data, split=[0.6, 0.2, 0.2], pack=True, max_length=64)
    capsys.readouterr()
    assert main(["data", r, "--show", "2"]) == 0
    shown = capsys.readouterr().out
    assert "format sharegpt: 30" in shown and "role gpt -> assistant" in shown and "[[w" in shown
    assert "no chat template: ChatML used" in shown  # the tiny tokenizer has none
    assert main(["data", r, "--show", "3", "--json", "--train-on", "last"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == 3 and all(set(o) == {"text", "trained", "tokens", "trained_tokens"} for o in objects)
    assert all(len(o["trained"]) == 1 and o["text"].rstrip().endswith(o["trained"][-1]) for o in objects)  # the last
    run = tmp_path / "run"
    assert main(["train", r, "--out", str(run)]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["task"] == "chat" and info["config"]["template"] == "chat"
    assert info["data"]["data"]["notes"]["format sharegpt"] == 30
    assert main(["eval", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["metrics"]) == {"base", "lora"} and ev["metrics"]["lora"]["loss"] < ev["metrics"]["base"]["loss"]
    sample = json.loads((run / "eval_samples.jsonl").read_text().splitlines()[0])
    assert sample["conversation"][0] == "system: w5 w6 w7" and sample["reference"].endswith("w4")
    # the page: base and adapter each keep their own conversation
    wb = Workbench(None, [str(run / "adapter")])
    assert wb.task == "chat"
    first = list(run_chat(wb, "w9 w10", {}, 0.0, 1.0, 0, 6, 42, ["run"]))
    status, box, histories, base_chat, base_stats, chat, stats = first[-1][:7]
    assert status == "" and box == "" and len(first[-1]) == 3 + 2 * (1 + ADAPTER_SLOTS)
    assert [m["role"] for m in base_chat] == ["user", "assistant"] and base_chat[0]["content"] == "w9 w10"
    reply = list(wb.reply(BASE, [{"role": "user", "content": "w9 w10"}], Sampling(max_new_tokens=6)))[-1].text
    assert base_chat[1]["content"] == reply and histories[BASE] == base_chat and histories["run"] == chat
    second = list(run_chat(wb, "w11", histories, 0.0, 1.0, 0, 6, 42, ["run"]))[-1]
    assert [m["content"] for m in second[2]["run"]][:3] == ["w9 w10", chat[1]["content"], "w11"]
    asked = chat + [{"role": "user", "content": "w11"}]
    assert second[2]["run"][3]["content"] == list(wb.reply("run", asked, Sampling(max_new_tokens=6)))[-1].text
    assert "type a message" in list(run_chat(wb, " ", histories, 0.0, 1.0, 0, 6, 42, ["run"]))[-1][0]
