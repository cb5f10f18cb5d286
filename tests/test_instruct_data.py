"""Instruction data pipeline (nora.data.instruct): loading, templates, masks, truncation, cache, batching."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from instruct_fixtures import (
    alpaca_records,
    build_instruct,
    openorca_records,
    write_alpaca_json,
    write_alpaca_jsonl,
    write_alpaca_parquet,
    write_openorca_parquet,
)

from nora.data import instruct
from nora.data.instruct import (
    ALPACA_PROMPT_INPUT,
    CHAT_PROMPT,
    IGNORE_INDEX,
    DataError,
    DataNotFoundError,
    InstructCollator,
    InstructDataConfig,
    LengthGroupedBatchSampler,
    PackedInstructDataset,
    assemble,
    build_instruct_datasets,
    format_alpaca_prompt,
    format_chat_prompt,
    pack_lengths,
    padding_waste,
    render_example,
    tokenization,
    tokens_in_batch,
)
from nora.models.tokenizer import build_offline_tokenizer


def decode_parts(tok, ex):
    ids, labels = ex["input_ids"], ex["labels"]
    prompt = [t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX]
    resp = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    return tok.decode(prompt), tok.decode(resp)


# --------------------------------------------------------------------------------------------- templates
def test_alpaca_template_text_exact():
    assert format_alpaca_prompt("Name a color.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert format_alpaca_prompt("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nBonjour\n\n### Response:\n"
    )
    assert ALPACA_PROMPT_INPUT.endswith("### Response:\n")


def test_chat_template_text_exact(tok):
    assert format_chat_prompt("Be brief.", "Why?") == "### System:\nBe brief.\n\n### User:\nWhy?\n\n### Assistant:\n"
    assert CHAT_PROMPT.format(system_prompt="S", question="Q") == "### System:\nS\n\n### User:\nQ\n\n### Assistant:\n"
    assert format_chat_prompt("", "Why?") == "### User:\nWhy?\n\n### Assistant:\n"
    assert tok.chat_template is None  # the offline tokenizer has none: plain template
    assert format_chat_prompt("S", "Q", tok) == format_chat_prompt("S", "Q")
    rec = {"id": "t0.1", "system_prompt": "S", "question": "Q", "response": "R"}
    assert render_example(rec, "openorca", "alpaca") == (format_alpaca_prompt("S\n\nQ"), "R")
    assert render_example({"instruction": "I", "input": "X", "output": "O"}, "alpaca", "chat") == (
        "### User:\nI\n\nX\n\n### Assistant:\n",
        "O",
    )


def test_tokenizer_chat_template_is_used(tmp_path, tok):
    t = build_offline_tokenizer()
    t.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert format_chat_prompt("S", "Q", t) == "<|begin_of_text|><system>S\n<user>Q\n<assistant>"
    assert format_chat_prompt("S", "Q", t, use_tokenizer_chat_template=False) == format_chat_prompt("S", "Q")
    path = write_openorca_parquet(tmp_path / "o.parquet", openorca_records(4))
    train, _, _ = build_instruct(tmp_path, t, name="openorca", path=str(path))
    ex = train[0]
    assert ex["input_ids"].count(t.bos_token_id) == 1 and ex["input_ids"][0] == t.bos_token_id  # BOS not doubled
    prompt, resp = decode_parts(t, ex)
    assert prompt.startswith("<|begin_of_text|><") and prompt.endswith("<assistant>")


# ------------------------------------------------------------------------------------------- label masks
@pytest.mark.parametrize("fmt", ["alpaca", "openorca"])
def test_mask_token_by_token(tmp_path, tok, fmt):
    if fmt == "alpaca":
        records = alpaca_records()
        path = write_alpaca_json(tmp_path / "alpaca_data.json", records)
    else:
        records = openorca_records(8)
        path = write_openorca_parquet(tmp_path / "orca.parquet", records)
    train, val, stats = build_instruct(tmp_path, tok, name=fmt, path=str(path), max_length=4096)
    assert val is None and len(train) == len(records) and stats["num_truncated"] == 0
    template = "alpaca" if fmt == "alpaca" else "chat"
    for rec, i in zip(records, range(len(train))):
        ex = train[i]
        prompt_text, response = render_example(rec, fmt, template)
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        n_prompt = len(tok(prompt_text)["input_ids"])  # BOS + prompt, as the tokenizer adds it
        for j, (t, lab) in enumerate(zip(ids, labels)):  # token by token: masked exactly up to the response
            assert lab == (IGNORE_INDEX if j < n_prompt else t), (i, j)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert ids[:n_prompt] == tok(prompt_text)["input_ids"]
        prompt, resp = decode_parts(tok, ex)
        assert resp == response + tok.eos_token  # exactly the response text + EOS
        assert prompt == tok.bos_token + prompt_text
        # the boundary is the joint tokenisation's: same ids as tokenising the whole text at once
        assert ids[:-1] == tok(prompt_text + response)["input_ids"]
    assert stats["num_boundary_fallback"] == 0


def test_boundary_fallback_never_supervises_prompt(tok):
    # a prompt ending mid-word: BPE merges across the boundary, so the response is tokenised on its own
    out = instruct.encode_examples(tok, ["The capital of Fr"], ["ance is Paris."], max_length=512)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert out["boundary_fallback"] == [True]
    resp = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(resp) == "ance is Paris." + tok.eos_token
    assert tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX]) == tok.bos_token + "The capital of Fr"


# -------------------------------------------------------------------------------------------- loading
def test_alpaca_json_jsonl_parquet_and_directories(tmp_path, tok):
    import datasets

    recs = alpaca_records(10)
    j = write_alpaca_json(tmp_path / "a" / "alpaca_data.json", recs)
    jl = write_alpaca_jsonl(tmp_path / "b" / "alpaca.jsonl", recs)
    pq = write_alpaca_parquet(tmp_path / "c" / "data" / "train-00000-of-00001.parquet", recs)
    ref = [build_instruct(tmp_path, tok, path=str(p))[0] for p in (j, jl, pq)]
    assert all(len(d) == 10 for d in ref)
    rows = [[d[i] for i in range(10)] for d in ref]
    assert rows[0] == rows[1] == rows[2]
    # a directory of jsonl files (read in name order) and a hub-style snapshot with split-named files
    write_alpaca_jsonl(tmp_path / "dir" / "part-0.jsonl", recs[:4])
    write_alpaca_jsonl(tmp_path / "dir" / "part-1.jsonl", recs[4:])
    d, _, st = build_instruct(tmp_path, tok, path=str(tmp_path / "dir"))
    assert st["num_rows"] == 10 and [d[i] for i in range(10)] == rows[0]
    write_alpaca_parquet(tmp_path / "c" / "data" / "test-00000-of-00001.parquet", recs[:3])
    d, _, st = build_instruct(tmp_path, tok, path=str(tmp_path / "c"))
    assert st["num_rows"] == 10
    d, _, st = build_instruct(tmp_path, tok, path=str(tmp_path / "c"), split="test")
    assert st["num_rows"] == 3
    # save_to_disk directories: a Dataset, and a DatasetDict whose split is picked by `split`
    ds = datasets.Dataset.from_list(recs)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved_dict"))
    d, _, _ = build_instruct(tmp_path, tok, path=str(tmp_path / "saved"))
    assert [d[i] for i in range(10)] == rows[0]
    d, _, st = build_instruct(tmp_path, tok, path=str(tmp_path / "saved_dict"), split="test")
    assert st["num_rows"] == 2
    with pytest.raises(DataError, match="no split 'dev'.*'train', 'test'"):
        build_instruct(tmp_path, tok, path=str(tmp_path / "saved_dict"), split="dev")


def _question_numbers(tok, dataset):
    return sorted(
        int(re.search(r"\(question (\d+)\)", tok.decode(dataset[i]["input_ids"])).group(1)) for i in range(len(dataset))
    )


def test_openorca_parquet_subset_and_validation_split(tmp_path, tok):
    write_openorca_parquet(tmp_path / "orca" / "1M-GPT4-Augmented.parquet", openorca_records(30), row_group_size=8)
    recs = openorca_records(50)[30:]
    write_openorca_parquet(tmp_path / "orca" / "3_5M-GPT3_5-Augmented.parquet", recs)
    kw = dict(name="openorca", path=str(tmp_path / "orca"), subset_size=20, val_size=4)
    train, val, st = build_instruct(tmp_path, tok, **kw)
    assert st["num_rows"] == 50 and st["num_selected"] == 20 and (len(train), len(val)) == (16, 4)
    # file order: 1M-GPT4 (questions 0..29) then 3_5M (30..49); a seeded sample draws from both
    tr, va = _question_numbers(tok, train), _question_numbers(tok, val)
    assert not set(tr) & set(va)
    chosen = sorted(tr + va)
    assert any(q < 30 for q in chosen) and any(q >= 30 for q in chosen)
    assert chosen == sorted(np.random.default_rng(0).permutation(50)[:20].tolist())
    again = build_instruct(tmp_path, tok, **kw)  # deterministic (from the cache), and so is a rebuild elsewhere
    assert _question_numbers(tok, again[0]) == tr
    fresh = build_instruct(tmp_path / "other", tok, **kw)
    assert _question_numbers(tok, fresh[0]) == tr and fresh[2]["cache_hit"] is False
    other_seed = build_instruct(tmp_path, tok, **{**kw, "seed": 1})
    assert sorted(_question_numbers(tok, other_seed[0]) + _question_numbers(tok, other_seed[1])) != chosen
    first, _, _ = build_instruct(tmp_path, tok, **{**kw, "subset_strategy": "first", "val_size": 0})
    assert _question_numbers(tok, first) == list(range(20))
    frac = build_instruct(tmp_path, tok, **{**kw, "val_size": 0.25})
    assert len(frac[1]) == 5


# ------------------------------------------------------------------------------------------ truncation
def test_truncation_policy_unit():
    prefix, eos = [0], 1
    p, r = list(range(10, 20)), list(range(100, 110))  # prompt 1 + 10 tokens, response 10 + EOS
    ex = assemble(p, r, prefix=prefix, eos_id=eos, max_length=22)
    assert not ex["truncated"] and ex["input_ids"] == [0] + p + r + [1]
    ex = assemble(p, r, prefix=prefix, eos_id=eos, max_length=15, min_response_tokens=4)  # response end cut
    assert ex["truncated"] and not ex["prompt_truncated"]
    assert ex["input_ids"] == [0] + p + r[:4] and ex["labels"] == [IGNORE_INDEX] * 11 + r[:4]  # no EOS
    ex = assemble(p, r, prefix=prefix, eos_id=eos, max_length=8, min_response_tokens=3)  # prompt cut from the left
    assert ex["prompt_truncated"] and ex["input_ids"] == [0, 16, 17, 18, 19, 100, 101, 102]
    assert ex["labels"] == [IGNORE_INDEX] * 5 + [100, 101, 102]
    ex = assemble(p, [], prefix=prefix, eos_id=eos, max_length=6, min_response_tokens=64)  # empty response: EOS kept
    assert ex["input_ids"] == [0, 16, 17, 18, 19, 1] and ex["labels"][-1] == 1
    ex = assemble(p, r, prefix=prefix, eos_id=eos, max_length=1)  # nothing left to supervise
    assert ex["input_ids"] == [0] and ex["labels"] == [IGNORE_INDEX]


def test_truncation_counted_and_logged(tmp_path, tok, caplog):
    recs = alpaca_records(12)
    path = write_alpaca_jsonl(tmp_path / "a.jsonl", recs)
    full, _, _ = build_instruct(tmp_path, tok, path=str(path), max_length=4096)
    max_len = int(np.median(full.lengths))
    expected = int((full.lengths > max_len).sum())
    assert 0 < expected < len(recs)
    with caplog.at_level(logging.INFO, logger="nora.data.instruct"):
        train, val, st = build_instruct(
            tmp_path, tok, path=str(path), max_length=max_len, min_response_tokens=8, val_size=2
        )
    assert train.num_truncated + val.num_truncated == st["num_truncated"] == expected
    assert train.num_total == len(train) == 10 and st["num_dropped"] == 0  # kept, not dropped
    assert max(train.lengths.max(), val.lengths.max()) == max_len
    assert f"{expected} truncated" in caplog.text
    for d in (train, val):
        for i in range(len(d)):
            ex = d[i]
            assert len(ex["input_ids"]) <= max_len and ex["input_ids"][0] == tok.bos_token_id
            assert sum(lab != IGNORE_INDEX for lab in ex["labels"]) >= 1
    # the smallest max_length still keeps BOS + one response token
    with pytest.raises(DataError, match="max_length"):
        InstructDataConfig(max_length=1)
    train, _, st = build_instruct(tmp_path, tok, path=str(path), max_length=2, min_response_tokens=1)
    assert st["num_dropped"] == 0 and all(train.lengths == 2) and st["num_prompt_truncated"] == 12
    # a tokenizer adding two tokens of its own leaves nothing to supervise in 2: dropped, counted, warned
    from tokenizers import processors

    t2 = build_offline_tokenizer()
    t2.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} {tok.pad_token} $A", special_tokens=[(tok.bos_token, 0), (tok.pad_token, 2)]
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nora.data.instruct"):
        train, val, st = build_instruct(tmp_path, t2, path=str(path), max_length=3, val_size=2)
    assert st["num_dropped"] == 0 and len(train) == 10
    with caplog.at_level(logging.INFO, logger="nora.data.instruct"):
        with pytest.raises(DataError, match="no training example left"):
            build_instruct(tmp_path, t2, path=str(path), max_length=2, val_size=2)
    assert "12 examples had no response token left" in caplog.text


# ----------------------------------------------------------------------------------------------- cache
def test_tokenised_once_then_cached(tmp_path, tok, monkeypatch):
    calls = []
    real = tokenization.tokenize_batch

    def counting(batch, **kw):
        calls.append(len(batch["instruction"]))
        return real(batch, **kw)

    monkeypatch.setattr(tokenization, "tokenize_batch", counting)
    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(10))
    train, val, st = build_instruct(tmp_path, tok, path=str(path), val_size=2)
    assert sum(calls) == 10 and st["cache_hit"] is False
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.arrow")}
    train2, val2, st2 = build_instruct(tmp_path, tok, path=str(path), val_size=2)
    assert sum(calls) == 10 and st2["cache_hit"] is True and st2["cache_path"] == st["cache_path"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.arrow")} == stamp
    assert [train2[i] for i in range(len(train2))] == [train[i] for i in range(len(train))]
    assert [val2[i] for i in range(2)] == [val[i] for i in range(2)]
    # a different max length, template, tokenizer or file content is a different cache entry
    build_instruct(tmp_path, tok, path=str(path), val_size=2, max_length=64)
    assert sum(calls) == 20
    build_instruct(tmp_path, tok, path=str(path), val_size=2, template="chat")
    assert sum(calls) == 30
    build_instruct(tmp_path, build_offline_tokenizer(vocab_size=400), path=str(path), val_size=2)
    assert sum(calls) == 40
    write_alpaca_json(path, alpaca_records(11))
    _, _, st3 = build_instruct(tmp_path, tok, path=str(path), val_size=2)
    assert sum(calls) == 51 and st3["cache_path"] != st["cache_path"]


# -------------------------------------------------------------------------------------------- batching
def test_collator_pads_and_masks(tok):
    feats = [
        {"input_ids": [0, 5, 6, 7, 1], "labels": [-100, -100, 6, 7, 1]},
        {"input_ids": [0, 9, 1], "labels": [-100, 9, 1]},
    ]
    c = InstructCollator.from_tokenizer(tok)
    b = c(feats)
    pad = tok.pad_token_id
    assert b["input_ids"].tolist() == [[0, 5, 6, 7, 1], [0, 9, 1, pad, pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 6, 7, 1], [-100, 9, 1, -100, -100]]
    assert tokens_in_batch(b) == (8, 5)
    b8 = InstructCollator(pad, pad_to_multiple_of=8)(feats)
    assert b8["input_ids"].shape == (2, 8) and b8["attention_mask"].sum() == 8 and (b8["labels"][:, 5:] == -100).all()
    left = InstructCollator(pad, padding_side="left")(feats)
    assert left["input_ids"][1].tolist() == [pad, pad, 0, 9, 1]
    assert left["attention_mask"][1].tolist() == [0, 0, 1, 1, 1]
    flat = InstructCollator(pad, padding_free=True)(feats)
    assert flat["input_ids"].tolist() == [[0, 5, 6, 7, 1, 0, 9, 1]] and "attention_mask" not in flat
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]] and tokens_in_batch(flat) == (8, 5)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_determinism_epochs_resume():
    lengths = np.random.default_rng(0).integers(5, 300, size=203)
    s = LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_mult=4)
    e0 = _epoch(s, 0)
    assert e0 == _epoch(LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_mult=4), 0)
    assert sorted(i for b in e0 for i in b) == list(range(203)) and len(e0) == len(s) == 26
    assert _epoch(s, 1) != e0 and sorted(i for b in _epoch(s, 1) for i in b) == list(range(203))
    assert _epoch(LengthGroupedBatchSampler(lengths, 8, seed=4, mega_batch_mult=4), 0) != e0
    for k in (0, 1, 7, 25, 26):  # resume at batch k gives exactly the rest of the epoch
        r = LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_mult=4)
        r.set_epoch(0)
        r.set_start(k)
        assert list(r) == e0[k:] and len(r) == 26 - k
        r2 = LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_mult=4, start_batch=k)
        assert list(r2) == e0[k:]
    # batches are length-grouped: within a mega-batch lengths are sorted
    spread = np.mean([np.ptp(lengths[b]) for b in e0])
    rand = LengthGroupedBatchSampler(lengths, 8, seed=3, group_by_length=False)
    assert spread < 0.3 * np.mean([np.ptp(lengths[b]) for b in _epoch(rand, 0)])
    ev = list(LengthGroupedBatchSampler(lengths, 8, shuffle=False))
    assert [i for b in ev for i in b] == np.argsort(-lengths, kind="stable").tolist()


def test_sampler_distributed_split():
    lengths = np.random.default_rng(1).integers(5, 300, size=240)
    R, B = 3, 4
    for drop_last in (True, False):
        ranks = [
            LengthGroupedBatchSampler(
                lengths, B, seed=0, num_replicas=R, rank=r, drop_last=drop_last, mega_batch_mult=5
            )
            for r in range(R)
        ]
        per = [_epoch(s, 2) for s in ranks]
        assert len({len(p) for p in per}) == 1 and len(per[0]) == len(ranks[0]) == 20
        flat = [[i for b in p for i in b] for p in per]
        assert all(len(set(a) & set(b)) == 0 for a in flat for b in flat if a is not b)  # disjoint
        assert sorted(sum(flat, [])) == list(range(240))
        # one process with the same global batch sees the union of the ranks' batches, step by step
        single = _epoch(LengthGroupedBatchSampler(lengths, B * R, seed=0, drop_last=drop_last, mega_batch_mult=5), 2)
        assert single == [sum((per[r][k] for r in range(R)), []) for k in range(len(single))]
    # a count not divisible by the ranks: equal batch counts, the shortfall repeated from the epoch's start
    lengths = np.random.default_rng(1).integers(5, 300, size=241)
    ranks = [LengthGroupedBatchSampler(lengths, B, num_replicas=R, rank=r) for r in range(R)]
    per = [list(s) for s in ranks]
    assert len({len(p) for p in per}) == 1 and [len(b) for b in per[0]] == [len(b) for b in per[1]]
    assert len(set(i for p in per for b in p for i in b)) == 241


def test_padding_waste():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(120), 0.6, size=20_000), 16, 512).astype(int)
    random_b = list(LengthGroupedBatchSampler(lengths, 16, seed=0, group_by_length=False))
    grouped = list(LengthGroupedBatchSampler(lengths, 16, seed=0))
    w_rand, w_group = padding_waste(lengths, random_b), padding_waste(lengths, grouped)
    w_group8 = padding_waste(lengths, grouped, pad_to_multiple_of=8)
    print(f"padding waste: random {w_rand:.3f}, length-grouped {w_group:.4f} ({w_group8:.4f} with multiple of 8)")
    assert w_rand > 0.5 and w_group < 0.05 and w_group8 < 0.07


# --------------------------------------------------------------------------------------------- packing
def test_pack_lengths():
    lengths = np.random.default_rng(0).integers(3, 60, size=300)
    rows = pack_lengths(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(lengths[r].sum() <= 64 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 64 * 1.1)) + 1
    assert rows == pack_lengths(lengths, 64)


def test_packing_keeps_examples_apart(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(8))
    plain, _, _ = build_instruct(tmp_path, tok, path=str(path), max_length=256)
    packed, _, st = build_instruct(tmp_path, tok, path=str(path), max_length=256, packing=True)
    assert isinstance(packed, PackedInstructDataset) and len(packed) < len(plain)
    assert st["packing"]["rows"] == len(packed)
    collate = InstructCollator.from_tokenizer(tok)
    batch = collate([packed[i] for i in range(min(2, len(packed)))])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    members = [i for r in packed.rows[:2] for i in r]
    assert tokens_in_batch(batch) == (
        int(plain.lengths[members].sum()),
        sum(sum(lab != IGNORE_INDEX for lab in plain[i]["labels"]) for i in members),
    )
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(members) and (batch["labels"][0, starts] == IGNORE_INDEX).all()
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(cfg).eval()
        model.config._attn_implementation = attn
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            bounds = starts + [batch["input_ids"].shape[1]]
            for k, i in enumerate(members):
                alone = model(input_ids=torch.tensor([plain[i]["input_ids"]]), use_cache=False).logits[0]
                torch.testing.assert_close(out[bounds[k] : bounds[k + 1]], alone, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_fields_name_the_file(tmp_path, tok):
    bad = [{"instruction": r["instruction"], "input": r["input"], "answer": r["output"]} for r in alpaca_records(3)]
    path = write_alpaca_jsonl(tmp_path / "d" / "bad.jsonl", bad)
    write_alpaca_jsonl(tmp_path / "d" / "a_good.jsonl", alpaca_records(3))
    with pytest.raises(DataError) as e:
        build_instruct(tmp_path, tok, path=str(tmp_path / "d"))
    msg = str(e.value)
    assert str(path) in msg and "['output']" in msg and "'instruction', 'input', 'output'" in msg and "answer" in msg
    orca = openorca_records(3)
    for r in orca:
        r.pop("system_prompt")
    p = tmp_path / "orca.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r[k] for r in orca] for k in ("id", "question", "response")}), str(p))
    with pytest.raises(DataError, match=r"orca\.parquet: missing field\(s\) \['system_prompt'\]"):
        build_instruct(tmp_path, tok, name="openorca", path=str(p))
    (tmp_path / "broken.json").write_text('[{"instruction": ')
    with pytest.raises(DataError, match="broken.json"):
        build_instruct(tmp_path, tok, path=str(tmp_path / "broken.json"))


def test_missing_path_and_config_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError) as e:
        build_instruct(tmp_path, tok, path=str(tmp_path / "nope.json"))
    assert isinstance(e.value, DataError) and "data.path=" in str(e.value)
    assert "instruction, input, output" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no .json/.jsonl/.parquet"):
        build_instruct(tmp_path, tok, path=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"unknown key\(s\) \['max_len'\]; valid keys: \['name', 'path'"):
        InstructDataConfig.from_dict({"name": "alpaca", "max_len": 128})
    cfg = InstructDataConfig.from_dict({"name": "openorca", "family": "text", "path": None}, ignore=["family"])
    assert cfg.resolved_hub_name == "Open-Orca/OpenOrca" and cfg.resolved_template == "chat"
    with pytest.raises(DataError, match="name='imagenet'"):
        InstructDataConfig(name="imagenet")
    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(5))
    with pytest.raises(DataError, match="val_size=5 .* leaves none"):
        build_instruct(tmp_path, tok, path=str(path), val_size=5)


def test_hub_offline_is_one_clear_error(tmp_path, tok, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_empty")
    for name, hub in (("alpaca", "tatsu-lab/alpaca"), ("openorca", "Open-Orca/OpenOrca")):
        with pytest.raises(DataNotFoundError) as e:
            build_instruct(tmp_path, tok, name=name, path=None)
        msg = str(e.value)
        assert hub in msg and "offline" in msg and "data.path=<file or dir>" in msg and "\n" not in msg
        assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained connection errors


def test_hub_gated_without_token_says_so(tmp_path, tok, monkeypatch):
    import datasets

    class GatedRepoError(Exception):
        pass

    def refuse(*a, **k):
        raise GatedRepoError("401 Client Error: Cannot access gated repo")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(DataNotFoundError, match="gated or private and no HF_TOKEN is set.*data.path="):
        build_instruct(tmp_path, tok, hub_name="someone/gated-set")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(DataNotFoundError, match="HF_TOKEN in the environment was refused"):
        build_instruct(tmp_path, tok, hub_name="someone/gated-set")


def test_stats_json_serialisable(tmp_path, tok):
    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(6))
    _, _, st = build_instruct(tmp_path, tok, path=str(path), val_size=1)
    json.dumps(st)
    assert st["num_train"] == 5 and st["num_val"] == 1 and st["train"]["num_supervised_tokens"] > 0


def test_null_fields_read_as_empty(tmp_path, tok):
    recs = alpaca_records(4)
    nulls = [dict(r, input=None) if not r["input"] else r for r in recs]
    a, _, _ = build_instruct(tmp_path, tok, path=str(write_alpaca_jsonl(tmp_path / "a.jsonl", recs)))
    b, _, _ = build_instruct(tmp_path, tok, path=str(write_alpaca_jsonl(tmp_path / "b.jsonl", nulls)))
    assert [a[i] for i in range(4)] == [b[i] for i in range(4)]


def test_null_required_field_is_rejected_with_file_and_record(tmp_path, tok):
    """A null output would train as an empty response: a real JSON file with "output": null at record 3 is
    refused with the file and the record index, before anything is tokenised or cached."""
    recs = alpaca_records(6)
    recs[3] = dict(recs[3], output=None)
    path = write_alpaca_json(tmp_path / "nulls.json", recs)
    assert json.loads(path.read_text())[3]["output"] is None
    with pytest.raises(DataError) as e:
        build_instruct(tmp_path, tok, path=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "record 3 (counting from 0)" in msg and "output=null" in msg
    assert not list((tmp_path / "cache").glob("alpaca-*"))
    # the same in an OpenOrca parquet file: a null question at record 0
    orca = openorca_records(4)
    orca[0] = dict(orca[0], question=None)
    opath = write_openorca_parquet(tmp_path / "o.parquet", orca)
    with pytest.raises(DataError, match=r"o\.parquet: record 0 \(counting from 0\) has question=null"):
        build_instruct(tmp_path, tok, name="openorca", path=str(opath))


def test_build_dataloader_from_omegaconf(tmp_path, tok):
    from omegaconf import OmegaConf

    from nora.data.instruct import build_dataloader

    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(20))
    cfg = InstructDataConfig.from_dict(
        OmegaConf.create({"name": "alpaca", "path": str(path), "val_size": 4, "cache_dir": str(tmp_path / "cache")})
    )
    train, val, _ = build_instruct_datasets(cfg, tok)
    loader = build_dataloader(train, cfg, tok, 4, seed=1)
    loader.batch_sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)
    assert sum(tokens_in_batch(b).tokens for b in batches) == train.num_tokens
    loader.batch_sampler.set_start(2)
    assert [b["input_ids"].tolist() for b in loader] == [b["input_ids"].tolist() for b in batches[2:]]
    ev = list(build_dataloader(val, cfg, tok, 3, train=False))
    assert sum(b["input_ids"].shape[0] for b in ev) == 4


@pytest.mark.parametrize("damage", ["truncated arrow", "truncated stats.json", "train/ missing"])
def test_a_damaged_tokenised_cache_is_rebuilt_with_a_line_saying_so(tmp_path, tok, caplog, damage):
    import shutil

    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(10))
    train, val, st = build_instruct(tmp_path, tok, path=str(path), val_size=2)
    before = [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]
    del train, val  # memory-mapped: cutting the file under a live map would be a bus error
    entry = Path(st["cache_path"])
    if damage == "truncated arrow":
        [arrow] = (entry / "train").glob("*.arrow")
        data = arrow.read_bytes()
        arrow.unlink()
        arrow.write_bytes(data[: len(data) // 2])
    elif damage == "truncated stats.json":
        stats = entry / "stats.json"
        stats.write_bytes(stats.read_bytes()[:40])
    else:
        shutil.rmtree(entry / "train")
    with caplog.at_level(logging.WARNING, logger="nora.data.instruct.cache"):
        train2, val2, st2 = build_instruct(tmp_path, tok, path=str(path), val_size=2)
    assert st2["cache_hit"] is False and st2["cache_path"] == str(entry)
    msg = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert msg.startswith(f"tokenised cache {entry} is damaged (") and msg.endswith("); rebuilding it")
    assert ([train2[i] for i in range(len(train2))], [val2[i] for i in range(len(val2))]) == before
    assert build_instruct(tmp_path, tok, path=str(path), val_size=2)[2]["cache_hit"] is True  # intact again


def test_an_empty_alpaca_file_is_one_line(tmp_path, tok):
    empty = tmp_path / "alpaca_data.json"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        build_instruct(tmp_path, tok, path=str(empty))
    assert str(err.value).startswith(f"{empty}: empty file (0 bytes: an interrupted copy or download?)")


def test_an_unwritable_cache_dir_says_to_set_nora_cache_dir(tmp_path, tok):
    from test_reliability import mounted

    from nora.errors import OutputError

    path = write_alpaca_json(tmp_path / "a.json", alpaca_records(10))
    with mounted(tmp_path / "ro", source="bind") as ro:
        with pytest.raises(OutputError) as err:
            build_instruct(tmp_path, tok, path=str(path), cache_dir=str(ro / "cache"))
    assert str(err.value) == (
        f"cannot write the tokenised-data cache {ro / 'cache'}: [Errno 30] Read-only file "
        "system; set NORA_CACHE_DIR (or dataset.cache_dir) to a writable folder"
    )
