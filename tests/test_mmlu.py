"""MMLU evaluation (nora.eval): data layouts, prompt format, scoring, aggregation, shot dropping,
batching, error messages, mmlu.json, adapter loading. Offline; fixtures are written by the tests."""

import json
import math
from types import SimpleNamespace

import peft
import pytest
import torch
from legacy_formats import write_two_part  # the format before NoRA was a peft method
from mmlu_fixtures import FIXTURE_SUBJECTS, make_fixture, write_csv, write_parquet, write_saved
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora.app.adapters import apply_adapter, find_adapter_dir
from nora.eval import (
    build_prompt,
    continuation_tokens,
    detect_source,
    evaluate_mmlu,
    load_mmlu,
    run_mmlu,
    subject_categories,
    subject_table,
    write_mmlu_json,
)
from nora.eval.mmlu import score_rows
from nora.eval.mmlu_data import MMLUQuestion
from nora.models.tokenizer import build_offline_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_offline_tokenizer()


def tiny_llama(tok, dtype=torch.float32, seed=0, max_pos=2048):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


class RiggedLM(nn.Module):
    """Fake causal LM: every position strongly predicts `` X``, where X is the right answer of the
    question the row ends with (looked up by its text), or always ``prefer``."""

    def __init__(self, tokenizer, fixture=None, prefer=None):
        super().__init__()
        self.tok, self.prefer = tokenizer, prefer
        self.ids = {k: v[0] for k, v in continuation_tokens(tokenizer).items()}
        self.answers = {q.strip(): "ABCD"[a] for sp in (fixture or {}).values() for q, _, a in sp["test"]}
        self.lengths = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b_size, t = input_ids.shape
        logits = torch.zeros(b_size, t, len(self.tok))
        for b in range(b_size):
            n = int(attention_mask[b].sum()) if attention_mask is not None else t
            self.lengths.append(n)
            letter = self.prefer
            if letter is None:
                text = self.tok.decode(input_ids[b, :n], skip_special_tokens=True)
                letter = self.answers[text.rsplit("\n\n", 1)[-1].split("\nA. ")[0]]
            logits[b, :, self.ids[letter]] = 5.0
        return SimpleNamespace(logits=logits)


def strip_volatile(d):
    return {k: v for k, v in d.items() if k not in ("date", "wall_time_s", "data")}


# ------------------------------------------------------------------------------ subjects
def test_subject_table_and_groupings():
    table = subject_table()
    assert len(table) == 57
    counts = {
        c: sum(v["category"] == c for v in table.values()) for c in ("STEM", "humanities", "social_sciences", "other")
    }
    assert counts == {"STEM": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    orig, lm = subject_categories("original"), subject_categories("lm_eval")
    assert orig["anatomy"] == "other" and lm["anatomy"] == "STEM"
    assert {s for s in orig if orig[s] != lm[s]} == {"anatomy"}
    with pytest.raises(ValueError, match="unknown MMLU grouping 'harness'"):
        subject_categories("harness")


# -------------------------------------------------------------------------------- prompt
def test_prompt_format_exact():
    shot = MMLUQuestion("high_school_biology", "What is a cell?", ("a", "b", "c", "d"), 2)
    q = MMLUQuestion("high_school_biology", "  Which one?\nPick. ", ("w", "x", "y", "z"), 0)
    want = (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What is a cell?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
        "Which one?\nPick.\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )
    assert build_prompt("high_school_biology", [shot], q) == want


def test_continuation_tokens_single_with_offline_tokenizer(tok):
    conts = continuation_tokens(tok)
    assert all(len(v) == 1 for v in conts.values())
    assert conts["A"] != tok("A", add_special_tokens=False)["input_ids"]  # " A" and "A" differ


# ------------------------------------------------------------------------------- layouts
def test_all_layouts_load_identically_and_score_identically(tmp_path, tok):
    fx = make_fixture()
    paths = {
        "csv": write_csv(tmp_path / "csv", fx),
        "parquet": write_parquet(tmp_path / "pq", fx),
        "parquet_all": write_parquet(tmp_path / "pq_all", fx, layout="all"),
        "saved": write_saved(tmp_path / "saved", fx),
        "saved_all": write_saved(tmp_path / "saved_all", fx, "all"),
    }
    assert detect_source(paths["csv"]) == "csv"
    assert all(detect_source(p) == "hf" for n, p in paths.items() if n != "csv")
    ref = load_mmlu(paths["csv"], subjects="available")
    assert sorted(ref) == sorted(FIXTURE_SUBJECTS)
    assert ref["anatomy"].test[1].question.startswith("  Consider") and "\n" in ref["anatomy"].test[1].question
    for name, p in paths.items():
        got = load_mmlu(p, subjects=list(FIXTURE_SUBJECTS))
        for s in FIXTURE_SUBJECTS:
            assert got[s].test == ref[s].test and got[s].dev == ref[s].dev, (name, s)
    model = tiny_llama(tok)
    results = {
        n: evaluate_mmlu(model, tok, p, subjects="available", progress=False).to_dict(include_predictions=True)
        for n, p in paths.items()
        if n in ("csv", "parquet", "saved_all")
    }
    assert results["csv"]["data"] == {"path": str(paths["csv"]), "source": "csv", "n_subjects": 4}
    assert strip_volatile(results["csv"]) == strip_volatile(results["parquet"]) == strip_volatile(results["saved_all"])
    # a CSV copy unpacked as <root>/data/{dev,test} is found from <root> as well
    write_csv(tmp_path / "release" / "data", fx)
    assert load_mmlu(tmp_path / "release", subjects=["anatomy"])["anatomy"].test == ref["anatomy"].test


# ------------------------------------------------------------------------------- scoring
def test_rigged_model_scores_100_and_prefer_a_scores_share_of_a(tmp_path, tok):
    fx = make_fixture(n_test=7)
    path = write_csv(tmp_path, fx)
    right = evaluate_mmlu(RiggedLM(tok, fx), tok, path, subjects="available", batch_size=3, progress=False)
    assert right.accuracy == 1.0 and right.n == 4 * 7
    assert all(s.correct == s.n for s in right.subjects.values())
    always_a = evaluate_mmlu(RiggedLM(tok, prefer="A"), tok, path, subjects="available", progress=False)
    n_a = sum(a == 0 for sp in fx.values() for _, _, a in sp["test"])
    assert 0 < n_a < 28
    assert always_a.correct == n_a and always_a.accuracy == n_a / 28
    assert all(p == 0 for s in always_a.subjects.values() for p in s.predictions)


def test_category_micro_averages_on_known_split(tmp_path, tok):
    answers = {"abstract_algebra": "AABD", "high_school_biology": "ABCDAA", "philosophy": "AAAB", "anatomy": "BBB"}
    fx = make_fixture(list(answers), answers=answers)
    path = write_csv(tmp_path, fx)
    model = RiggedLM(tok, prefer="A")
    r = evaluate_mmlu(model, tok, path, subjects=list(answers), k=2, progress=False).to_dict()
    cats = r["categories"]
    # STEM: abstract_algebra 2/4 + high_school_biology 3/6 = 5/10 (not the mean of subject accuracies)
    assert (cats["STEM"]["correct"], cats["STEM"]["n"]) == (5, 10) and cats["STEM"]["accuracy"] == 0.5
    assert cats["humanities"] == {"accuracy": 0.75, "correct": 3, "n": 4, "subjects": ["philosophy"]}
    assert cats["other"] == {"accuracy": 0.0, "correct": 0, "n": 3, "subjects": ["anatomy"]}
    assert cats["social_sciences"] == {"accuracy": None, "correct": 0, "n": 0, "subjects": []}
    assert r["overall"] == {"accuracy": 8 / 17, "correct": 8, "n": 17}
    assert r["subjects"]["high_school_biology"]["accuracy"] == 0.5
    # lm_eval grouping: anatomy joins STEM, overall unchanged
    lm = evaluate_mmlu(model, tok, path, subjects=list(answers), k=2, grouping="lm_eval", progress=False).to_dict()
    assert lm["categories"]["STEM"]["subjects"] == ["abstract_algebra", "anatomy", "high_school_biology"]
    assert (lm["categories"]["STEM"]["correct"], lm["categories"]["STEM"]["n"]) == (5, 13)
    assert lm["categories"]["other"]["n"] == 0 and lm["overall"] == r["overall"]
    assert lm["grouping"] == "lm_eval" and lm["subjects"]["anatomy"]["category"] == "STEM"


def test_shots_dropped_until_prompt_fits(tmp_path, tok):
    fx = make_fixture(["abstract_algebra"], n_test=6, long_words=10)
    path = write_csv(tmp_path, fx)
    data = load_mmlu(path, subjects=["abstract_algebra"])["abstract_algebra"]
    lengths = [
        [len(tok(build_prompt("abstract_algebra", data.dev[:j], q))["input_ids"]) for j in range(6)] for q in data.test
    ]
    max_len = sorted(row[2] for row in lengths)[3]  # some questions fit 2 shots, others fewer/more
    model = RiggedLM(tok, fx)
    r = evaluate_mmlu(model, tok, path, subjects=["abstract_algebra"], k=5, max_length=max_len, progress=False)
    sr = r.subjects["abstract_algebra"]
    want = [max(j for j in range(6) if row[j] + 1 <= max_len + 1) for row in lengths]  # ctx + " X" - 1 <= max_len
    assert sr.shots_used == want and len(set(want)) > 1
    d = r.to_dict()["subjects"]["abstract_algebra"]
    assert d["shots_dropped"] == sum(5 - w for w in want) > 0
    assert d["questions_with_dropped_shots"] == 6 and d["shots_used_min"] == min(want) and d["truncated"] == 0
    assert r.to_dict()["shots"]["dropped"] == d["shots_dropped"]
    assert sr.correct == 6  # still the right question at the end of each prompt
    assert max(model.lengths) <= max_len
    # nothing fits: left truncation to max_length tokens, counted
    model = RiggedLM(tok, prefer="B")
    r = evaluate_mmlu(model, tok, path, subjects=["abstract_algebra"], k=5, max_length=16, progress=False)
    d = r.to_dict()["subjects"]["abstract_algebra"]
    assert d["truncated"] == 6 and d["shots_used_min"] == 0 and d["shots_dropped"] == 30
    assert set(model.lengths) == {16}


def test_zero_shot_needs_no_dev_split(tmp_path, tok):
    fx = make_fixture(["philosophy"])
    path = write_csv(tmp_path, fx)
    (path / "dev" / "philosophy_dev.csv").unlink()
    r = evaluate_mmlu(RiggedLM(tok, fx), tok, path, subjects=["philosophy"], k=0, progress=False)
    assert r.accuracy == 1.0 and r.to_dict()["k"] == 0
    with pytest.raises(
        FileNotFoundError, match=r"MMLU dev file for subject 'philosophy' not found: .*philosophy_dev\.csv"
    ):
        evaluate_mmlu(RiggedLM(tok, fx), tok, path, subjects=["philosophy"], k=5, progress=False)


def test_batched_equals_unbatched(tmp_path, tok):
    # exact up to rounding: 1e-10 in float64; in float32 the GEMM shapes change the last bits (~1e-6)
    fx = make_fixture(["anatomy"], n_test=6)
    path = write_csv(tmp_path, fx)
    data = load_mmlu(path, subjects=["anatomy"], k=3)
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        model = tiny_llama(tok, dtype=dtype)
        ref = evaluate_mmlu(model, tok, data, k=3, batch_size=1, keep_logits=False, progress=False).subjects["anatomy"]
        for bs, keep in ((4, False), (6, False), (4, True)):
            got = evaluate_mmlu(model, tok, data, k=3, batch_size=bs, keep_logits=keep, progress=False).subjects[
                "anatomy"
            ]
            assert got.predictions == ref.predictions
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=atol, rtol=0)
        if dtype != torch.float64:
            continue
        # and equal a plain, unpadded forward of each prompt
        with torch.no_grad():
            for q, lp in zip(data["anatomy"].test, ref.logprobs):
                ids = tok(build_prompt("anatomy", data["anatomy"].dev[:3], q), return_tensors="pt")["input_ids"]
                last = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
                want = [last[c[0]].item() for c in continuation_tokens(tok).values()]
                assert max(abs(a - b) for a, b in zip(lp, want)) <= atol


def test_score_rows_right_padding_matches_single_rows(tok):
    model = tiny_llama(tok, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2)]
    conts = [[[7], [rows[0][-1], 8]], [[9]], [[rows[2][-1], 10]], [[11], [12], [13]], [[14]]]  # row = ctx + c[:-1]
    batched = score_rows(model, rows, conts, batch_size=5, pad_id=tok.pad_token_id, keep_logits=False)
    with torch.no_grad():
        for row, cs, got in zip(rows, conts, batched):
            logp = torch.log_softmax(model(torch.tensor([row])).logits[0], -1)
            want = [sum(logp[len(row) - len(c) + t, tok_id].item() for t, tok_id in enumerate(c)) for c in cs]
            assert len(got) == len(cs) and max(abs(a - b) for a, b in zip(got, want)) < 1e-10


def test_split_continuation_tokens_are_summed(tmp_path):
    # a tokenizer without the " A" merge: each continuation is two tokens ("Ġ", "A")
    corpus = "Answer: the question is which one\nThe following are multiple choice questions about it.\n" * 3
    tok = build_offline_tokenizer(vocab_size=300, corpus=corpus)
    conts = continuation_tokens(tok)
    assert all(len(v) == 2 for v in conts.values())
    fx = make_fixture(["anatomy"], n_test=4)
    path = write_csv(tmp_path, fx)
    data = load_mmlu(path, subjects=["anatomy"], k=2)
    model = tiny_llama(tok, dtype=torch.float64)
    r = evaluate_mmlu(model, tok, data, k=2, batch_size=3, progress=False).subjects["anatomy"]
    with torch.no_grad():
        for q, lp in zip(data["anatomy"].test, r.logprobs):
            prompt = build_prompt("anatomy", data["anatomy"].dev[:2], q)
            n_ctx = len(tok(prompt)["input_ids"])
            for j, letter in enumerate("ABCD"):
                ids = tok(prompt + " " + letter, return_tensors="pt")["input_ids"]
                logp = torch.log_softmax(model(ids).logits[0], -1)
                want = sum(logp[t - 1, ids[0, t]].item() for t in range(n_ctx, ids.shape[1]))
                assert ids.shape[1] == n_ctx + 2 and abs(lp[j] - want) < 1e-10


# -------------------------------------------------------------------------------- errors
def test_clear_errors_for_missing_data_and_unknown_subjects(tmp_path, tok):
    with pytest.raises(
        FileNotFoundError,
        match=r"MMLU data directory not found: .*nowhere; expected the original "
        r"CSV layout .*hendrycks/data\.tar.*cais/mmlu",
    ):
        load_mmlu(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"MMLU data directory not found: .*nowhere"):
        load_mmlu(tmp_path / "nowhere", source="hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MMLU data found in .*empty"):
        load_mmlu(tmp_path / "empty")
    fx = make_fixture(["anatomy", "philosophy"])
    csv_root = write_csv(tmp_path / "csv", fx)
    with pytest.raises(
        FileNotFoundError,
        match=r"MMLU test file for subject 'astronomy' not found: "
        r".*test/astronomy_test\.csv; expected the original CSV layout",
    ):
        load_mmlu(csv_root, subjects=["anatomy", "astronomy"])
    with pytest.raises(FileNotFoundError, match=r"MMLU test files for 55 of the 57 requested subjects are missing"):
        load_mmlu(csv_root)  # default: all 57 subjects
    with pytest.raises(ValueError, match=r"unknown MMLU subject 'anatomyy' \(did you mean anatomy"):
        load_mmlu(csv_root, subjects=["anatomyy"])
    with pytest.raises(ValueError, match="k=6 shots requested but its dev split .* holds only 5"):
        load_mmlu(csv_root, subjects="anatomy", k=6)
    pq_root = write_parquet(tmp_path / "pq", fx)
    with pytest.raises(
        FileNotFoundError,
        match=r"MMLU test split for subject 'virology' not found in .*pq; "
        r"expected .*pq/virology/test-\*\.parquet",
    ):
        load_mmlu(pq_root, subjects="virology,anatomy")
    with pytest.raises(ValueError, match="unknown MMLU source 'json'"):
        load_mmlu(pq_root, source="json")
    assert sorted(load_mmlu(pq_root, subjects="available")) == ["anatomy", "philosophy"]


def test_csv_that_is_not_utf8_is_named_in_the_error(tmp_path):
    fx = make_fixture(["anatomy", "philosophy"])
    root = write_csv(tmp_path / "csv", fx)
    bad = root / "test" / "philosophy_test.csv"
    # a spreadsheet program's latin-1 re-save: 'é' is the single byte 0xe9, invalid in UTF-8
    bad.write_bytes('"Is Descartes\' cogito a valid inférence?",yes,no,maybe,never,A\n'.encode("latin-1"))
    assert sorted(load_mmlu(root, subjects="anatomy")) == ["anatomy"]  # the other subjects still load
    with pytest.raises(
        ValueError,
        match=r"test/philosophy_test\.csv, line 1: not UTF-8 text \(byte 0xe9 at offset "
        r"33\); the MMLU CSV files are UTF-8, re-encode this one",
    ):
        load_mmlu(root, subjects="available")
    bad.write_bytes(b"What is 1+1?,2,3,4,5,A\nWhat is 2+2?,3,4,5,\xff\xfe,B\n")  # invalid UTF-8 bytes, line 2
    (root / "dev" / "anatomy_dev.csv").write_bytes(bad.read_bytes())
    bad.write_bytes((root / "test" / "anatomy_test.csv").read_bytes())
    with pytest.raises(ValueError, match=r"dev/anatomy_dev\.csv, line 2: not UTF-8 text \(byte 0xff at offset 42\)"):
        load_mmlu(root, subjects="anatomy")


def test_csvs_that_are_no_subject_are_listed_in_a_warning(tmp_path):
    fx = make_fixture(["anatomy", "philosophy"])
    root = write_csv(tmp_path / "data", fx)
    (root / "test" / "not_a_subject_test.csv").write_text("q,a,b,c,d,A\n")
    (root / "test" / "anatomy_test_old.csv").write_text("q,a,b,c,d,A\n")
    (root / "dev" / "notes.csv").write_text("x\n")
    with pytest.warns(UserWarning) as caught:
        data = load_mmlu(tmp_path / "data", subjects="available", k=2)
    assert sorted(data) == ["anatomy", "philosophy"] and len(data["anatomy"].test) == 6
    assert [str(w.message) for w in caught] == [
        f"MMLU: 3 CSV file(s) in {root} are not among the 57 subjects and are ignored: "
        "test/anatomy_test_old.csv, test/not_a_subject_test.csv, dev/notes.csv"
    ]
    with pytest.warns(UserWarning) as caught:  # zero-shot reads no dev split, so only test/ is looked at
        load_mmlu(tmp_path / "data", subjects="anatomy", k=0)
    assert "2 CSV file(s)" in str(caught[0].message) and "notes.csv" not in str(caught[0].message)


# -------------------------------------------------------------------------------- output
def test_run_mmlu_writes_mmlu_json_atomically(tmp_path, tok):
    fx = make_fixture()
    path = write_csv(tmp_path / "data", fx)
    out = tmp_path / "run"
    ident = {"name": "tiny-llama", "dtype": "float32"}
    adapter = {"kind": "nora++"}
    r = run_mmlu(
        RiggedLM(tok, prefer="C"),
        tok,
        path,
        out,
        subjects="available",
        k=3,
        batch_size=4,
        model_identity=ident,
        adapter_identity=adapter,
        include_predictions=True,
        progress=False,
    )
    files = sorted(p.name for p in out.iterdir())
    assert files == ["mmlu.json"]  # no temp file left behind
    d = json.loads((out / "mmlu.json").read_text())
    assert d["format"] == "nora.mmlu/1" and d["task"] == "mmlu" and d["k"] == 3 and d["grouping"] == "original"
    assert set(d) == {
        "format",
        "task",
        "split",
        "k",
        "grouping",
        "date",
        "wall_time_s",
        "overall",
        "categories",
        "subjects",
        "shots",
        "protocol",
        "data",
        "model",
        "adapter",
        "predictions",
    }
    assert d["model"] == ident and d["adapter"] == adapter
    assert list(d["categories"]) == ["STEM", "humanities", "social_sciences", "other"]
    assert d["overall"]["n"] == 24 and math.isclose(d["overall"]["accuracy"], r.accuracy)
    assert d["protocol"]["continuations"] == [" A", " B", " C", " D"] and d["protocol"]["single_token_continuations"]
    assert d["shots"] == {"requested": 3, "dropped": 0, "questions_with_dropped_shots": 0, "truncated_questions": 0}
    assert d["predictions"]["anatomy"] == [2] * 6 and d["wall_time_s"] >= 0 and d["date"].endswith("+00:00")
    # rewriting replaces the file in one step
    write_mmlu_json(r, out, model={"name": "other"})
    assert json.loads((out / "mmlu.json").read_text())["model"] == {"name": "other"}
    assert sorted(p.name for p in out.iterdir()) == ["mmlu.json"]


# ------------------------------------------------------------------------------ adapters
def _train_like(tok, kind):
    base = tiny_llama(tok)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    if kind in ("lora", "dora", "nora++"):
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=kind == "dora")
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05)
    else:
        model = base
    if kind in ("nora", "nora++"):
        nora.apply_nora(model)
        with torch.no_grad():
            for m in nora.nora_modules(model).values():
                for p in m.parameters(recurse=False):
                    p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), state


@pytest.mark.parametrize("kind", ["nora++", "nora++ two-part", "lora", "dora", "nora"])
def test_apply_adapter_reproduces_logits(tmp_path, tok, kind):
    two_part = kind.endswith(" two-part")  # a run saved before NoRA was a peft method still loads
    kind = kind.removesuffix(" two-part")
    model, base_state = _train_like(tok, kind)
    run_dir = tmp_path / "run"
    adir = run_dir / "adapter"
    if kind == "nora++" and two_part:
        write_two_part(model, adir)
        assert (adir / "nora_adapter.safetensors").exists()
    elif kind == "nora++":
        nora.save_nora(model, adir)  # one peft adapter, peft type NORA
    elif kind == "nora":
        nora.save_nora(model, adir)
    else:
        model.save_pretrained(str(adir))
    ids = torch.randint(3, len(tok), (2, 20))
    with torch.no_grad():
        want = model(ids).logits
    for where in (run_dir, adir):  # the run directory or the adapter directory itself
        fresh = tiny_llama(tok, seed=123)
        fresh.load_state_dict(base_state)
        loaded, ident = apply_adapter(fresh, find_adapter_dir(where))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
        assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert ident["kind"] == kind and ident["dir"] == str(adir.resolve())
    assert (
        ident["components"] == {"nora++": ["lora", "nora"], "lora": ["lora"], "dora": ["dora"], "nora": ["nora"]}[kind]
    )
    if kind != "nora":
        assert ident["peft"]["r"] == 4 and ident["peft"]["use_dora"] == (kind == "dora")
        assert ident["peft"]["peft_type"] == ("NORA" if kind == "nora++" and not two_part else "LORA")
        assert len(ident["files"]["adapter_model.safetensors"]) == 64
    if kind in ("nora", "nora++"):
        assert ident["nora"]["variant"] == "nora" and ident["nora"]["layers"] == 2
    json.dumps(ident)  # JSON-able, goes into mmlu.json
    if kind == "nora++":  # evaluation through the peft wrapper, with and without logits_to_keep
        fx = make_fixture(["anatomy"], n_test=4)
        data = load_mmlu(write_csv(tmp_path / "data", fx), subjects=["anatomy"], k=2)
        a = evaluate_mmlu(loaded, tok, data, k=2, progress=False).subjects["anatomy"]
        b = evaluate_mmlu(model, tok, data, k=2, keep_logits=False, progress=False).subjects["anatomy"]
        assert a.predictions == b.predictions
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-5, rtol=0)


def test_apply_adapter_reports_missing_adapter(tmp_path, tok):
    (tmp_path / "run").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"no adapter found in .*run or .*run/adapter: expected peft files "
        r"\(adapter_config\.json, adapter_model\.safetensors\)",
    ):
        apply_adapter(tiny_llama(tok), find_adapter_dir(tmp_path / "run"))
    (tmp_path / "run" / "adapter").mkdir()
    (tmp_path / "run" / "adapter" / "nora_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete adapter .*nora_adapter.safetensors missing"):
        apply_adapter(tiny_llama(tok), find_adapter_dir(tmp_path / "run"))
