"""One local SQuAD file as training and evaluation data: split by title, never trained on the eval questions."""
import json
import os

import pytest

from configs import schema
from custom_datasets.sources import BUNDLED_TOKENIZER, load_tokenizer
from custom_datasets.squad_retrieve import SquadRetrieveTask, load_squad_rows, split_by_title


def squad_file(tmp_path, titles=5, paragraphs=4, questions=3):
    data = [{"title": f"T{t}", "paragraphs": [
        {"context": f"Paragraph {p} of title {t}.",
         "qas": [{"question": f"Question {q} on paragraph {p} of title {t}?",
                  "answers": [{"text": "x", "answer_start": 0}] if q else []} for q in range(questions)]}
        for p in range(paragraphs)]} for t in range(titles)]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return str(path)


def cfg(path, **kw):
    conf, _ = schema.load(None, {"dataset": "squad_retrieve", "squad_train_source": path, "squad_eval_source": path,
                                 "multidoc_num_noise_docs_eval": [2, 5], "multidoc_num_noise_docs_train": 3,
                                 "eval_set_size": 4, **kw})
    return conf


def test_split_holds_out_whole_titles(tmp_path):
    rows = load_squad_rows(squad_file(tmp_path))
    train, held = split_by_title(rows, 2, "f")
    assert len({r["title"] for r in held}) == 2 and len({r["title"] for r in train}) == 3
    assert not {r["title"] for r in held} & {r["title"] for r in train}
    assert not {r["context"] for r in held} & {r["context"] for r in train}
    assert sorted(map(str, train + held)) == sorted(map(str, rows))        # every row on exactly one side
    assert split_by_title(rows, 2, "f") == (train, held)                     # a fixed choice


def test_task_never_trains_on_an_evaluation_question(tmp_path):
    path = squad_file(tmp_path)
    task = SquadRetrieveTask(cfg(path, squad_heldout_titles=2), load_tokenizer(BUNDLED_TOKENIZER))
    tok = task.tok
    eval_questions = {r["question"] for r in task.eval_rows}
    eval_paragraphs = {r["context"] for r in task.eval_rows}
    assert len(eval_questions) == 2 * 4 * 3
    for i in range(task.train_len()):
        (chunk,) = task.train_item(i, 0)
        text = tok.decode(chunk.input_ids)
        assert not any(q in text for q in eval_questions) and not any(p in text for p in eval_paragraphs)
    for i in range(4):
        text = tok.decode(task.eval_prompt(5, i)[0])
        assert not any(r["question"] in text for r in task.train_rows)


def test_one_file_as_both_sources_needs_the_split(tmp_path):
    path = squad_file(tmp_path)
    with pytest.raises(schema.ConfigError) as e:
        cfg(path)
    assert "\n" not in str(e.value) and "training would see the evaluation questions" in str(e.value)
    assert "squad_heldout_titles" in str(e.value)
    assert cfg(path, eval_mode=True)["eval_mode"]                         # evaluating only: nothing is trained
    with pytest.raises(schema.ConfigError, match="splits one local .json used as both"):
        cfg(path, squad_heldout_titles=2, squad_train_source="rajpurkar/squad_v2:train")
    other_spelling = str(tmp_path / "." / ".." / tmp_path.name / "squad.json")   # the same file, another path
    with pytest.raises(schema.ConfigError, match="training would see the evaluation questions"):
        cfg(path, squad_train_source=other_spelling)
    with pytest.raises(schema.ConfigError, match="train on the hub's train split"):
        cfg("rajpurkar/squad_v2:validation")


def test_evaluating_one_file_whole_says_so(tmp_path):
    path = squad_file(tmp_path)
    _, notes = schema.load(None, {"dataset": "squad_retrieve", "squad_train_source": path, "squad_eval_source": path,
                                  "eval_mode": True})
    assert any("squad_heldout_titles is 0: every question of the file is evaluated" in n for n in notes)


def test_a_file_without_titles_cannot_be_split(tmp_path):
    path = tmp_path / "untitled.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q?", "answers": []}]}]}]}))
    with pytest.raises(ValueError, match="has 1 title\\(s\\); a split by title needs at least 2"):
        split_by_title(load_squad_rows(str(path)), 1, str(path))


@pytest.mark.parametrize("held,docs,train_docs,why", [
    (5, [2], 3, "has 5 titles, so hold out 1 to 4"),
    (1, [2, 12], 3, "held-out titles have 4 distinct paragraphs, fewer than the 13"),
    (4, [2], 4, "training titles have 4 distinct paragraphs, fewer than the 5 documents")])
def test_impossible_splits_name_the_value(tmp_path, held, docs, train_docs, why):
    path = squad_file(tmp_path)
    with pytest.raises(ValueError, match=why):
        SquadRetrieveTask(cfg(path, squad_heldout_titles=held, multidoc_num_noise_docs_eval=docs,
                              multidoc_num_noise_docs_train=train_docs), load_tokenizer(BUNDLED_TOKENIZER))


def _trained_checkpoint(tmp_path, train_source, held):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "finetune_ssm_config.json").write_text(json.dumps({
        "dataset": "squad_retrieve", "eval_mode": False, "squad_train_source": train_source,
        "squad_eval_source": train_source, "squad_heldout_titles": held}))
    return str(ck)


@pytest.mark.parametrize("trained_held,eval_held,ok", [(2, 2, True), (2, 0, False), (2, 3, False), (0, 0, False)])
def test_evaluating_a_fine_tune_on_its_own_file_holds_out_what_it_held_out(tmp_path, trained_held, eval_held, ok):
    import finetune_ssm

    path = squad_file(tmp_path)
    conf = cfg(path, eval_mode=True, load_cp=_trained_checkpoint(tmp_path, path, trained_held),
               squad_heldout_titles=eval_held)
    if ok:
        finetune_ssm.check_squad_split(conf)
        return
    with pytest.raises(finetune_ssm.UsageError) as err:
        finetune_ssm.check_squad_split(conf)
    msg = str(err.value)
    assert f"squad_heldout_titles={trained_held}" in msg and "questions it trained on" in msg
    assert (f"--set squad_heldout_titles={trained_held}" in msg) if trained_held else ("another file" in msg)


@pytest.mark.parametrize("spelling", ["dots", "relative", "symlink"])
def test_the_file_it_trained_on_under_another_path_is_still_checked(tmp_path, monkeypatch, spelling):
    """The fine-tune's run config may name its file as ./x.json, ../dir/x.json or through a link."""
    import finetune_ssm

    path = squad_file(tmp_path)
    trained = {"dots": str(tmp_path / "." / ".." / tmp_path.name / "squad.json"), "relative": "./squad.json",
               "symlink": str(tmp_path / "link.json")}[spelling]
    if spelling == "symlink":
        os.symlink(path, trained)
    monkeypatch.chdir(tmp_path)                              # ./squad.json is the file from here
    assert trained != path
    conf = cfg(path, eval_mode=True, load_cp=_trained_checkpoint(tmp_path, trained, 2), squad_heldout_titles=0)
    with pytest.raises(finetune_ssm.UsageError, match="--set squad_heldout_titles=2"):
        finetune_ssm.check_squad_split(conf)


def test_a_fine_tune_evaluated_on_another_file_is_not_checked(tmp_path):
    import finetune_ssm

    other = tmp_path / "other"
    other.mkdir()
    conf = cfg(squad_file(tmp_path), eval_mode=True, squad_heldout_titles=0,
               load_cp=_trained_checkpoint(tmp_path, squad_file(other), 0))
    finetune_ssm.check_squad_split(conf)                    # trained on other/squad.json, evaluated on squad.json


def test_the_command_line_refuses_in_one_line(tmp_path, capsys):
    import finetune_ssm
    from tests.helpers import one_line_stderr

    path = squad_file(tmp_path)
    ck = _trained_checkpoint(tmp_path, path, 2)
    sets = ["dataset=squad_retrieve", f"squad_train_source={path}", f"squad_eval_source={path}", "eval_mode=true",
            f"load_cp={ck}", "eval_set_size=4", "multidoc_num_noise_docs_eval=[2]"]
    rc = finetune_ssm.main(["--dry-run", "--device", "cpu", *[a for s in sets for a in ("--set", s)]])
    assert rc == 1
    one_line_stderr(capsys, "squad_heldout_titles=2", "--set squad_heldout_titles=2")
