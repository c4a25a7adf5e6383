"""The lm_corpus pretraining task and its tokenizer script (custom_datasets/{lm_corpus,tokenize_corpus}.py)."""
import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch

from custom_datasets.lm_corpus import LMCorpusTask, Shard
from custom_datasets.sources import BUNDLED_TOKENIZER, load_tokenizer
from custom_datasets.tokenize_corpus import main as tokenize_main
from engine.errors import BadFileError

BOOKS = {"101": "It was a dark and stormy night; the rain fell in torrents. " * 40,
         "102": "Call me Ishmael. Some years ago, never mind how long precisely. " * 30}


def make_tar(path, books, split="train"):
    with tarfile.open(path, "w:xz") as tar:
        for book_id, text in books.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{split}/{book_id}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def corpus(tmp_path):
    out = tmp_path / "corpus"
    for split in ("train", "validation"):
        make_tar(tmp_path / f"{split}.tar.xz", BOOKS, split)
        assert tokenize_main(["--split", split, "--out", str(out), str(tmp_path / f"{split}.tar.xz")]) == 0
    return out


def cfg(corpus_dir, **kw):
    return {"lm_corpus_dir": str(corpus_dir), "lm_context_len_train": 64, "lm_eval_split": "validation",
            "lm_eval_context_lens": [32, 64], "lm_eval_windows": 4, "lm_train_samples_per_epoch": None, "seed": 7, **kw}


def test_shard_holds_each_book_then_eos(corpus):
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    shard = Shard(str(corpus / "train.train.bin"))
    expected = []
    for text in BOOKS.values():                      # archive order, each book followed by <|endoftext|>
        expected += tok.encode(text) + [tok.eos_token_id]
    assert shard.tokens.tolist() == expected
    assert [b["id"] for b in shard.meta["books"]] == list(BOOKS)
    assert shard.meta["books"][1]["offset"] == shard.meta["books"][0]["tokens"] + 1


def test_rerun_keeps_shard_and_other_input_is_refused(corpus, tmp_path, capsys):
    make_tar(tmp_path / "train.tar.xz", BOOKS)       # same bytes as the fixture's
    assert tokenize_main(["--split", "train", "--out", str(corpus), str(tmp_path / "train.tar.xz")]) == 0
    assert "already tokenized" in capsys.readouterr().out
    make_tar(tmp_path / "train.tar.xz", {"103": "Other text entirely. " * 50})
    assert tokenize_main(["--split", "train", "--out", str(corpus), str(tmp_path / "train.tar.xz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists for another input" in err[0]


@pytest.mark.parametrize("text", ["[1]", ""])
def test_rerun_over_a_damaged_shard_json_is_one_line(corpus, tmp_path, capsys, text):
    from tests.helpers import one_line_stderr

    make_tar(tmp_path / "train.tar.xz", BOOKS)
    (corpus / "train.train.json").write_text(text)
    capsys.readouterr()
    assert tokenize_main(["--split", "train", "--out", str(corpus), str(tmp_path / "train.tar.xz")]) == 1
    one_line_stderr(capsys, f"{corpus / 'train.train.json'}: ", "run again")


def test_truncated_shard_is_one_clear_error(corpus):
    path = corpus / "train.train.bin"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)
    with pytest.raises(ValueError, match="truncated copy"):
        Shard(str(path))


@pytest.mark.parametrize("text,found", [("{}", "no 'tokens'"), ("[1]", "not a JSON object"),
                                        ('{"tokens": true}', "'tokens': True"), ('{"tokens": -2}', "'tokens': -2"),
                                        ('{"tokens": "8"}', "'tokens': '8'"), ("", "not valid JSON"),
                                        ('{"tokens": 1', "not valid JSON")])
def test_bad_shard_json_is_one_clear_error(corpus, text, found):
    (corpus / "train.train.json").write_text(text)
    with pytest.raises(BadFileError) as e:
        Shard(str(corpus / "train.train.bin"))
    assert str(e.value).startswith(f"{corpus / 'train.train.json'}: {found}") and "tokenize_corpus.py" in str(e.value)


def _tiny_model(path):
    from models import MambaConfig, MambaLMHeadModel

    MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50280, ssm_cfg={"d_state": 4})).save_pretrained(path)


@pytest.mark.parametrize("text", ["{}", "[1]"])
@pytest.mark.parametrize("entry", ["finetune_ssm", "state_horizon"])
def test_bad_shard_json_through_the_command_lines(corpus, tmp_path, capsys, text, entry):
    from tests.helpers import one_line_stderr

    (corpus / "validation.validation.json").write_text(text)
    if entry == "state_horizon":
        from tools import state_horizon

        _tiny_model(str(tmp_path / "m"))
        rc = state_horizon.main(["--model", str(tmp_path / "m"), "--corpus", str(corpus), "--split", "validation"])
    else:
        import finetune_ssm

        conf = {"dataset": "lm_corpus", "lm_corpus_dir": str(corpus), "output_dir": str(tmp_path), "decimating_layers": [1],
                "activate_logging": False, "scratch_model_config": {"d_model": 16, "n_layer": 2, "ssm_cfg": {"d_state": 4}}}
        (tmp_path / "c.json").write_text(json.dumps(conf))
        rc = finetune_ssm.main(["--config", str(tmp_path / "c.json"), "--device", "cpu", "--run-name", "r"])
    assert rc == 1
    one_line_stderr(capsys, f"{corpus / 'validation.validation.json'}: ", "tokenize_corpus.py")


def test_a_shard_of_no_tokens_loads_empty(corpus):
    (corpus / "train.none.bin").write_bytes(b"")           # numpy cannot memory-map an empty file
    (corpus / "train.none.json").write_text('{"tokens": 0}')
    assert len(Shard(str(corpus / "train.none.bin"))) == 0


def test_train_items_are_windows_and_deterministic(corpus):
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    task = LMCorpusTask(cfg(corpus), tok)
    flat = np.asarray(Shard(str(corpus / "train.train.bin")).tokens).tolist()
    assert task.train_len() == len(flat) // 64
    seen = set()
    for i in range(20):
        (chunk,) = task.train_item(i, 0)
        assert len(chunk.input_ids) == 64 and chunk.labels == chunk.input_ids[1:]
        starts = [s for s in range(len(flat) - 63) if flat[s:s + 64] == chunk.input_ids]
        assert starts, "a window must be a contiguous run of the shard"
        seen.add(starts[0])
        assert task.train_item(i, 0)[0].input_ids == chunk.input_ids       # pure function of (seed, epoch, index)
    assert len(seen) > 10                                                   # and not the same window each time
    assert task.train_item(0, 1)[0].input_ids != task.train_item(0, 0)[0].input_ids


def test_eval_perplexity_equals_direct_computation(corpus):
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    task = LMCorpusTask(cfg(corpus), tok, train=False)
    torch.manual_seed(0)
    vocab = tok.vocab_size
    emb = torch.randn(vocab, 8)

    class Bigram(torch.nn.Module):        # any causal model will do: logits depend on the current token only
        def forward(self, x, num_last_tokens=0):
            logits = emb[x] @ emb.T
            return type("Out", (), {"logits": logits[:, -num_last_tokens:]})()

    res = task.run_cell(Bigram(), {"ctx_len": 32}, "cpu")
    flat = np.asarray(Shard(str(corpus / "validation.validation.bin")).tokens)
    starts = np.linspace(0, len(flat) - 33, 4).astype(int)
    nll = []
    for s in starts:
        w = torch.from_numpy(flat[s:s + 33].astype(np.int64))
        logp = torch.log_softmax(emb[w[:-1]] @ emb.T, -1)
        nll += (-logp[torch.arange(32), w[1:]]).tolist()
    assert res["scored_tokens"] == 4 * 32 and res["windows"] == 4
    assert res["score"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)   # fp32 sums in another order


def test_length_no_shard_reaches_is_recorded_and_left_out_of_the_score(corpus, capsys):
    from tests.helpers import one_line_stderr

    capsys.readouterr()
    longest = len(Shard(str(corpus / "validation.validation.bin")))
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    task = LMCorpusTask(cfg(corpus, lm_eval_context_lens=[32, 64, 100_000]), tok, train=False)
    one_line_stderr(capsys, f"lm_eval_context_lens [100000]: no validation shard is longer (longest: {longest:,} tokens")
    rec = task.run_cell(None, {"ctx_len": 100_000}, "cpu")           # nothing to measure: the model is not called
    assert rec["windows"] == 0 and rec["scored_tokens"] == 0 and math.isnan(rec["score"])
    assert rec["note"] == f"no windows: no validation shard is longer than 100,000 tokens (longest: {longest:,})"
    measured = [{"ctx_len": 32, "score": 5.0, "windows": 4}, {"ctx_len": 64, "score": 7.0, "windows": 4}]
    score, table = task.summarize(measured + [{"ctx_len": 100_000, **rec}])
    assert score == 6.0 and table.splitlines()[-1] == "score: mean over 32, 64 only (no windows at 100K)"


def test_an_empty_eval_split_has_no_windows(corpus):
    for ext in ("bin", "json"):
        os.remove(corpus / f"validation.validation.{ext}")
    (corpus / "validation.none.bin").write_bytes(b"")
    (corpus / "validation.none.json").write_text('{"tokens": 0}')
    task = LMCorpusTask(cfg(corpus), load_tokenizer(BUNDLED_TOKENIZER), train=False)
    assert task.windows(32) == []                                    # was a division by the split's 0 tokens
    assert task.run_cell(None, {"ctx_len": 32}, "cpu")["windows"] == 0


def test_missing_corpus_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenize_corpus.py"):
        LMCorpusTask(cfg(tmp_path / "nothing"), load_tokenizer(BUNDLED_TOKENIZER))


def test_shipped_pretraining_config_loads():
    from configs import schema

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "pretrain_gutenberg.json")
    conf, _ = schema.load(path, device="cpu")
    assert conf["dataset"] == "lm_corpus" and conf["scratch_model_config"]["n_layer"] == 24
    with open(path) as f:
        assert json.load(f)["lm_context_len_train"] == 2048


def test_pg19_files_for_finetuning_and_evaluation(tmp_path):
    """--pg19 writes the ppl_test format: train books as train_set.pt, other splits as test_set.pt,
    so one pg19_dir of links to both fine-tunes and evaluates (issue 13, item 3)."""
    from configs import schema
    from custom_datasets.pg19 import PG19Task

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    held_out = {"201": "The old man and the sea met at dawn, quietly. " * 25}
    for split, books in (("train", BOOKS), ("test", held_out)):
        make_tar(tmp_path / f"{split}.tar.xz", books, split)
        assert tokenize_main(["--split", split, "--pg19", "--out", str(tmp_path / "c"), str(tmp_path / f"{split}.tar.xz")]) == 0
    assert sorted(os.listdir(tmp_path / "c" / "pg19_train")) == ["train_set.pt"]
    assert sorted(os.listdir(tmp_path / "c" / "pg19_test")) == ["test_set.pt"]
    both = tmp_path / "ft"
    both.mkdir()
    os.symlink(tmp_path / "c" / "pg19_train" / "train_set.pt", both / "train_set.pt")
    os.symlink(tmp_path / "c" / "pg19_test" / "test_set.pt", both / "test_set.pt")
    conf, _ = schema.load(None, {"dataset": "ppl_test", "pg19_dir": str(both)})
    task = PG19Task(conf, tok)
    assert [b["input_tokens"][0].tolist() for b in task.train_books] == [tok.encode(t) for t in BOOKS.values()]
    assert [b["input_tokens"][0].tolist() for b in task.eval_books] == [tok.encode(t) for t in held_out.values()]
    assert [b["short_book_title"] for b in task.train_books] == list(BOOKS)
