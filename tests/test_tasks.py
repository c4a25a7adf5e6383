"""Task data and scoring, byte for byte against the reference strings (spec Appendix B)."""
import io
import json
import math
import os
import pickle
import time

import numpy as np
import pytest
import torch

from configs import schema
from custom_datasets import niah
from custom_datasets.base import TrainChunk
from custom_datasets.niah import NiahTask
from custom_datasets.sources import load_tokenizer, wikitext_rows
from engine.errors import BadFileError
from tests.conftest import SHARED

SQUAD_FILE = os.path.join(SHARED, "data", "squad_v2", "cs224n-split", "dev-v2.0.json")
needs_squad = pytest.mark.skipif(not os.path.exists(SQUAD_FILE), reason="needs ../shared/data/squad_v2")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("EleutherAI/gpt-neox-20b")


def test_tokenizer_facts(tok):
    assert tok.encode("The pass key is 12345.") == [510, 1509, 2234, 310, 1249, 16767, 15]
    assert tok.encode(niah.ANSWER_PREFIX) == [187, 32869, 27, 209]
    assert len(tok.encode(niah.QUESTION)) == 22 and tok.eos_token_id == 0 and tok.vocab_size == 50277


def test_passkey_strings_are_the_originals():
    assert niah.QUESTION == "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it:\n"
    assert niah.FACT.format(k=42) == "The pass key is 42. Remember it. 42 is the pass key. "
    assert niah.ANSWER_PREFIX == "\nAnswer: "


def test_wikitext_rows_match_the_hf_loader():
    rows = wikitext_rows("wikitext/wikitext-2-raw-v1", "test")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(wikitext_rows("wikitext/wikitext-2-raw-v1", "validation")) == 3760


def _niah_cfg(**kw):
    cfg, _ = schema.load(None, {"niah_noise_split_train": "validation", "niah_samples_per_cell": 3,
                                "niah_needle_depths_eval": [0, 0.5, 1], "niah_context_lens_eval": [1000, 2000], **kw})
    return cfg


def test_passkey_prompts(tok):
    task = NiahTask(_niah_cfg(), tok)
    for cell in task.eval_cells():
        prompts, answers, needles = task.eval_prompts(cell["depth"], cell["ctx_len"])
        assert (prompts, answers, needles) == task.eval_prompts(cell["depth"], cell["ctx_len"])   # deterministic
        for p, a, pos in zip(prompts, answers, needles):
            n = cell["ctx_len"]
            assert len(p) == n + 26 and p[:22] == tok.encode(niah.QUESTION) and p[-4:] == [187, 32869, 27, 209]
            ctx = p[22:-4]
            fact = tok.encode(niah.FACT.format(k=a))
            start = pos - niah.KEY_OFFSET_IN_FACT
            assert ctx[start:start + len(fact)] == fact
            d = cell["depth"]
            assert int(n * max(0, d - 0.1)) <= start < max(int(n * min(1, d + 0.1)) - len(fact), 1)


def test_passkey_training_item(tok):
    task = NiahTask(_niah_cfg(niah_context_len_train=400), tok)
    (chunk,) = task.train_item(5, 0)
    code = task.train_codes[5]
    assert chunk.labels == tok.encode(code) + [0]
    assert chunk.input_ids[-len(chunk.labels) - 4:-len(chunk.labels)] == [187, 32869, 27, 209]
    assert len(chunk.input_ids) == 22 + 400 + 4 + len(chunk.labels)
    assert task.train_item(5, 0)[0].input_ids == chunk.input_ids != task.train_item(5, 1)[0].input_ids


def test_passkey_answer_as_in_context_copies_the_haystack_tokens(tok):
    task = NiahTask(_niah_cfg(niah_context_len_train=400, niah_answer_as_in_context=True), tok)
    for i in range(5):
        (chunk,) = task.train_item(i, 0)
        key = chunk.labels[:-1]
        assert chunk.labels == tok.encode(" " + task.train_codes[i]) + [0]
        fact_start = next(j for j in range(len(chunk.input_ids)) if chunk.input_ids[j:j + 4] == [510, 1509, 2234, 310])
        assert chunk.input_ids[fact_start + 4:fact_start + 4 + len(key)] == key       # the haystack's own tokens
        assert task.score_response(tok.decode(key + [0]), task.train_codes[i])        # and they score as correct


def test_passkey_training_curriculum(tok):
    task = NiahTask(_niah_cfg(niah_context_len_train=400, niah_context_len_train_curriculum=[100, 200]), tok)
    lens = [len(task.train_item(0, e)[0].input_ids) - 26 - len(task.train_item(0, e)[0].labels) for e in range(4)]
    assert lens == [100, 200, 400, 400]


@pytest.mark.parametrize("text,ok", [("12345<|endoftext|>", True), ("12345 is it", True), (" 12345", True),
                                     ("123456", False), ("1234 5", False), ("<|endoftext|>12345", False)])
def test_passkey_scoring(tok, text, ok):
    assert NiahTask(_niah_cfg(), tok, train=False).score_response(text, "12345") is ok


def test_no_allowed_slot_falls_back_to_nearest_boundary():
    rng = np.random.default_rng(0)
    # one 100-token sentence: no boundary inside depth 0.5 ± 0.1 -> nearest boundary, no IndexError
    assert niah.choose_slot([100], 110, 10, 0.5, 0.1, rng) in (0, 1)


@needs_squad
def test_squad_prompts_and_labels(tok):
    from custom_datasets.squad_retrieve import DOC, PROMPT_END, SquadRetrieveTask

    assert DOC.format(q="Q?", i=7, doc="P.") == " <|Query|> Q? <|Document 7|> P."
    cfg, _ = schema.load(None, {"dataset": "squad_retrieve", "squad_eval_source": SQUAD_FILE,
                                "squad_train_source": SQUAD_FILE, "squad_heldout_titles": 6, "eval_set_size": 3})
    task = SquadRetrieveTask(cfg, tok)
    ids, gid = task.eval_prompt(40, 1)
    text = tok.decode(ids)
    assert text.endswith(" <|Answer|> <|Document") and text.count(" <|Query|> ") == 41
    paras = [seg.split("|> ", 1)[1] for seg in text.split(" <|Query|> ")[1:]]
    assert len(set(paras)) == 41                               # de-duplicated noise
    assert f"<|Document {gid}|>" in text
    (chunk,) = task.train_item(2, 0)
    full = tok.decode(chunk.input_ids)
    assert tok.encode(full) == chunk.input_ids                 # the label is the tail of the full sequence
    assert tok.decode(chunk.labels).endswith("|>") and tok.decode(chunk.labels).startswith(" ")
    assert PROMPT_END in full


def test_squad_eval_questions_and_slots_follow_the_original_arrays():
    # reference spec Appendix A: first eval rows and golden slots for n = 10
    from custom_datasets.squad_retrieve import EVAL_SPLIT_SEED

    d = os.path.join(os.path.dirname(os.path.dirname(__file__)), "custom_datasets", "multidoc_squad")
    h = np.load(os.path.join(d, "has_answer_indices_val.npy"), allow_pickle=False)
    assert h[np.random.default_rng(EVAL_SPLIT_SEED).permutation(len(h))[:5]].tolist() == [7410, 3555, 11698, 507, 6641]
    r = np.load(os.path.join(d, "random_indices_for_num_docs_before_golden_val.npy"), allow_pickle=False)
    assert [int(x) % 11 for x in r[:10]] == [0, 1, 10, 5, 5, 4, 10, 3, 10, 7]


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("resp,ok", [(" 527|>", True), ("527|> junk", True), (" 52|>", False), (" 527", True)])
# " 527" counts: the original cuts at the first "|>" and re-appends it before comparing; with the
# original format a leading space is wrong (the prompt already ends with the space token)
def test_squad_scoring(resp, ok, original):
    from custom_datasets.squad_retrieve import SquadRetrieveTask

    task = SquadRetrieveTask.__new__(SquadRetrieveTask)
    task.cfg = {"multidoc_original_format": original}
    expect = ok and not (original and resp.startswith(" "))
    assert task.score_response(resp, 527) is expect


@needs_squad
def test_squad_original_format(tok):
    from custom_datasets.squad_retrieve import SquadRetrieveTask

    cfg, _ = schema.load(None, {"dataset": "squad_retrieve", "squad_eval_source": SQUAD_FILE, "squad_train_source": SQUAD_FILE,
                                "squad_heldout_titles": 6, "eval_set_size": 2, "multidoc_original_format": True})
    task = SquadRetrieveTask(cfg, tok)
    ids, gid = task.eval_prompt(10, 0)
    assert ids[-1] == 209 and tok.decode(ids).endswith(" <|Answer|> <|Document ")   # the lone space token
    (chunk,) = task.train_item(0, 0)
    assert tok.decode(chunk.labels).endswith("|>") and not tok.decode(chunk.labels).startswith(" ")
    assert tok.decode(chunk.input_ids).endswith("|>")


class _Uniform(torch.nn.Module):
    """A 'model' with equal logits everywhere: its perplexity is the vocabulary size."""

    def forward(self, ids, num_last_tokens=0):
        return type("O", (), {"logits": torch.zeros(ids.shape[0], num_last_tokens, 64)})()


def _pg19(tmp_path, tok, lengths):
    from custom_datasets.pg19 import PG19Task
    from custom_datasets.tokenize_pg19 import save_split

    books = [{"short_book_title": f"b{t}", "input_tokens": torch.randint(0, 64, (1, t))} for t in lengths]
    save_split(books, str(tmp_path), "test")
    save_split(books, str(tmp_path), "train")
    cfg, _ = schema.load(None, {"dataset": "ppl_test", "pg19_dir": str(tmp_path), "ppl_test_pred_len": 10,
                                "ppl_test_context_lens_eval": [50, 500], "ppl_test_context_len_train": 40})
    return PG19Task(cfg, tok)


def test_pg19_windows_and_perplexity(tmp_path, tok):
    task = _pg19(tmp_path, tok, [60, 500, 1200])
    # w=50: T=60 -> stride 10, starts 0 (1 window); T=500 -> stride 45: 0..405 (10); T=1200 -> 115: 0..1035 (10)
    assert len(list(task.windows(50))) == 21
    assert len(list(task.windows(500))) == 10                        # only the 1200-token book; T == w skipped
    res = task.run_cell(_Uniform(), {"ctx_len": 50}, "cpu")
    assert math.isclose(res["score"], 64, rel_tol=1e-6) and res["scored_tokens"] == 210


def test_pg19_length_no_book_reaches_is_recorded_and_left_out_of_the_score(tmp_path, tok, capsys):
    from tests.helpers import one_line_stderr

    capsys.readouterr()
    task = _pg19(tmp_path, tok, [60, 300])                   # window lengths 50 and 500: no book is longer than 500
    one_line_stderr(capsys, "ppl_test_context_lens_eval [500]: no test book is longer (longest: 300 tokens)")
    recs = [{**c, **task.run_cell(_Uniform(), c, "cpu")} for c in task.eval_cells()]
    assert [r["windows"] for r in recs] == [11, 0] and recs[1]["scored_tokens"] == 0 and math.isnan(recs[1]["score"])
    assert recs[1]["note"] == "no windows: no test book is longer than 500 tokens (longest: 300)"
    score, table = task.summarize(recs)
    assert math.isclose(score, 64, rel_tol=1e-6)             # the 50-token length alone; fp32 sums of log 64
    assert "no windows" in table and table.splitlines()[-1] == "score: mean over 50 only (no windows at 500)"


def test_length_curve_summary_says_what_it_averaged():
    from custom_datasets.base import length_curve_summary

    nan = float("nan")
    old = {"ctx_len": 4000, "score": nan, "windows": 0}      # a record written before 'note' existed
    score, table = length_curve_summary([{"ctx_len": 2000, "score": 30.0, "windows": 3}, old,
                                         {"ctx_len": 1000, "score": 10.0, "windows": 5}], "ppl")
    assert score == 20.0 and table.splitlines()[-1] == "score: mean over 1K, 2K only (no windows at 4K)"
    score, table = length_curve_summary([{"ctx_len": 1000, "score": 10.0, "windows": 5}], "ppl")
    assert score == 10.0 and "score:" not in table          # every length measured: the table as before
    score, table = length_curve_summary([old], "ppl")
    assert math.isnan(score) and table.splitlines()[-1] == "score: none (no windows at any length: 4K)"
    score, _ = length_curve_summary([{"ctx_len": 1000, "score": nan, "windows": 5},   # measured NaN: a diverged
                                     {"ctx_len": 2000, "score": 10.0, "windows": 5}], "ppl")   # model is no score
    assert math.isnan(score)


def test_pg19_chunks_train_every_target_once(tmp_path, tok):
    task = _pg19(tmp_path, tok, [300])
    task.chunks = 2
    chunks = task.train_item(0, 0)
    window = chunks[-1].input_ids
    assert len(window) == 40 and [len(c.input_ids) for c in chunks] == [20, 40]
    assert chunks[0].labels + chunks[1].labels == window[1:]
    assert isinstance(chunks[0], TrainChunk) and chunks[1].resp_len == 21


def test_pg19_missing_data_message(tmp_path, tok):
    from custom_datasets.pg19 import PG19Task

    cfg, _ = schema.load(None, {"dataset": "ppl_test", "pg19_dir": str(tmp_path / "none")})
    with pytest.raises(FileNotFoundError, match="tokenize_pg19.py"):
        PG19Task(cfg, tok)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD_SPLIT = _saved([{"short_book_title": "b", "input_tokens": torch.zeros(1, 50, dtype=torch.long)}])


# what torch.load(weights_only=True) raises on each: EOFError, KeyError, RuntimeError (zip), UnicodeDecodeError,
# UnpicklingError (a pickle that would call os.system), then files that load but are no list of books
@pytest.mark.parametrize("content", [b"", b"hello world\n", GOOD_SPLIT[:len(GOOD_SPLIT) // 2],
                                     b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", pickle.dumps(os.system, protocol=2),
                                     _saved({"input_tokens": torch.zeros(1, 5)}), _saved([torch.zeros(1, 5)]),
                                     _saved([{"input_tokens": torch.zeros(5, dtype=torch.long)}]),
                                     _saved([{"input_tokens": torch.zeros(1, 5)}])],
                         ids=["empty", "text", "truncated", "bad-utf8", "hostile-pickle", "dict", "no-dicts",
                              "1d-tokens", "float-tokens"])
def test_damaged_pg19_split_is_one_clear_error(tmp_path, content):
    from custom_datasets.pg19 import load_split

    (tmp_path / "test_set.pt").write_bytes(content)
    with pytest.raises(BadFileError) as e:
        load_split(str(tmp_path), "test")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "test_set.pt")) and "tokenize_pg19.py" in msg and "\n" not in msg
    assert "weights_only=False" not in msg                       # torch's advice would run the file's code


def test_damaged_pg19_split_through_the_command_line(tmp_path, capsys):
    import finetune_ssm
    from tests.helpers import one_line_stderr

    bad = tmp_path / "pg19" / "test_set.pt"
    bad.parent.mkdir()
    bad.write_bytes(bytes(range(256)))
    conf = {"dataset": "ppl_test", "pg19_dir": str(bad.parent), "output_dir": str(tmp_path), "activate_logging": False,
            "scratch_model_config": {"d_model": 16, "n_layer": 2, "ssm_cfg": {"d_state": 4}}, "decimating_layers": [1]}
    (tmp_path / "c.json").write_text(json.dumps(conf))
    capsys.readouterr()
    assert finetune_ssm.main(["--config", str(tmp_path / "c.json"), "--device", "cpu", "--run-name", "r"]) == 1
    one_line_stderr(capsys, f"{bad}: ", "tokenize_pg19.py")


def test_unreachable_hub_for_tokenizer_fails_fast(monkeypatch, tmp_path):
    from models.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t = time.time()
    with pytest.raises(HubUnavailableError, match="'someone/tokenizer'.*tokenizer.json"):
        load_tokenizer("someone/tokenizer", cache_dir=str(tmp_path))
    assert time.time() - t < 10


def test_passkey_cells_of_one_length_batch_like_one_by_one(tok):
    from models import DecimatingMambaModel, MambaConfig

    torch.manual_seed(0)
    model = DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50277, ssm_cfg={"d_state": 4}),
                                 decimation_config=dict(activate=True, decimating_layers=[1], L_base=200))
    task = NiahTask(_niah_cfg(niah_samples_per_cell=2, eval_batch_tokens=3 * 1026), tok, train=False)
    cells = [c for c in task.eval_cells() if c["ctx_len"] == 1000]
    sizes, generate = [], model.generate
    model.generate = lambda ids, **kw: sizes.append(ids.shape[0]) or generate(ids, **kw)
    batched = task.run_cells(model, cells, "cpu")
    del model.generate
    assert sizes == [3, 3]                           # 6 prompts of 1,026 tokens, at most 3 * 1,026 per batch
    single = [task.run_cell(model, c, "cpu") for c in cells]
    assert [r["responses"] for r in batched] == [r["responses"] for r in single]
    assert [r["needle_positions"] for r in batched] == [r["needle_positions"] for r in single]
