"""The lm-eval model "decimamba" (decimamba_lm_eval.py) on the shipped checkpoint: loglikelihood and
generate_until equal what the model computes directly (decimation on: the continuation or the
prompt's tail is protected), and a small synthetic task runs through lm_eval.simple_evaluate."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'lm-eval[hf,ruler]==0.4.*'")
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (lm-eval[hf])")

from tokenizers import Tokenizer  # noqa: E402

import decimamba_lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from models import DecimatingMambaModel, MambaLMHeadModel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(REPO, "checkpoints", "passkey_small_deci")
TOKENIZER = os.path.join(REPO, "data", "gpt-neox-20b", "tokenizer.json")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(CKPT, "model.safetensors")), reason="no shipped checkpoint")
# decimation that really drops tokens at these prompt lengths (~100-250 tokens)
DECI_ARGS = dict(decimating_layers="[3]", decimation_beta=0.5, L_base=24, decimation_min_seq_len=4)
DECI = dict(activate=True, decimating_layers=[3], beta=0.5, L_base=24, min_seq_len=4)
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it:\n"
# Sums of fp32 log-probabilities over a few tokens: batched (right-padded) and single-row calls
# reduce in different orders, ~1e-6 per token; 1e-4 is far below any real difference (>0.01).
LL_TOL = 1e-4


def passkey_prompt(key: str, before: int, after: int, end: str = "\nAnswer: ") -> str:
    """The passkey task's prompt (custom_datasets/niah.py) with a repeated-sentence haystack; it
    ends as in training ("\nAnswer: "), or without the space for a continuation " KEY"."""
    return (QUESTION + FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * after
            + end)


PAIRS = [(passkey_prompt("51203", 4, 3, "\nAnswer:"), " 51203"), (passkey_prompt("51203", 4, 3, "\nAnswer:"), " 97311"),
         (FILLER * 6 + "The grass is", " green."), (FILLER * 2 + "The sky", " is blue. The sun")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(TOKENIZER)


def lm_of(**kw):
    return decimamba_lm_eval.DeciMambaLM(pretrained=CKPT, device="cpu", **kw)


def direct_loglikelihood(model, tok, ctx, cont):
    """sum log p(cont | ctx) from the model itself, the continuation protected from decimation."""
    c = tok.encode(ctx).ids
    whole = tok.encode(ctx + cont).ids
    assert whole[:len(c)] == c
    cont_ids = whole[len(c):]
    inp = torch.tensor([(c + cont_ids)[:-1]])
    with torch.no_grad():
        out = model(inp, num_last_tokens=len(cont_ids))
    logp = F.log_softmax(out.logits[0].float(), -1)
    target = torch.tensor(cont_ids)
    ll = logp.gather(1, target[:, None]).sum().item()
    return ll, bool((logp.argmax(-1) == target).all()), out.kept_indices, inp.shape[1]


@pytest.mark.parametrize("deci", [False, True], ids=["vanilla", "deci"])
def test_loglikelihood_equals_direct(tok, deci):
    lm = lm_of(batch_size=3, **(DECI_ARGS if deci else {}))
    model = (DecimatingMambaModel.from_pretrained(CKPT, decimation_config=DECI) if deci
             else MambaLMHeadModel.from_pretrained(CKPT))
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        want, want_greedy, kept, length = direct_loglikelihood(model, tok, ctx, cont)
        assert ll == pytest.approx(want, abs=LL_TOL) and greedy == want_greedy
        if deci:      # decimation dropped context tokens, and kept the scored tail
            n_cont = len(tok.encode(ctx + cont).ids) - len(tok.encode(ctx).ids)
            assert len(kept[0][1]) < length and kept[0][1][-n_cont:].tolist() == list(range(length - n_cont, length))
    if deci:          # and it changed the numbers (decimation is really on in the wrapper)
        vanilla = lm_of(batch_size=3).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)],
                                                    disable_tqdm=True)
        assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(got, vanilla))


@pytest.mark.parametrize("deci", [False, True], ids=["vanilla", "deci"])
def test_generate_until_equals_model_generate(tok, deci):
    lm = lm_of(batch_size=2, **(DECI_ARGS if deci else {}))
    model = (DecimatingMambaModel.from_pretrained(CKPT, decimation_config=DECI) if deci
             else MambaLMHeadModel.from_pretrained(CKPT))
    prompts = [passkey_prompt("51203", 5, 2), passkey_prompt("8842", 1, 1)]      # unequal: left padding
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)],
                            disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt).ids])
        seq = model.generate(ids, max_length=ids.shape[1] + 8, eos_token_id=0)    # 0: GPT-NeoX <|endoftext|>
        want = tok.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("\n")[0]
        assert text == want
    assert "51203" in got[0]        # the shipped model retrieves the key at this length


def test_protect_tail_and_bad_args():
    lm = lm_of(protect_tail=40, prefill_chunk_size=64, **DECI_ARGS)
    (text,) = lm.generate_until([Instance("generate_until", {}, (passkey_prompt("51203", 5, 2),
                                                                 {"until": ["\n"], "max_gen_toks": 8}), 0)],
                                disable_tqdm=True)
    assert "51203" in text
    with pytest.raises(ValueError, match="decimating_layers='x3'"):
        lm_of(decimating_layers="x3")
    with pytest.raises(ValueError, match="protect_tail=0"):
        lm_of(protect_tail=0)
    assert decimamba_lm_eval.parse_layers("[10,14]") == [10, 14] == decimamba_lm_eval.parse_layers("10;14")


def test_simple_evaluate_synthetic_tasks(tmp_path, tok):
    """lm-eval's own pipeline (task YAML, local JSON data, metrics, sample log) with the model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    keys = ["51203", "8842", "70019"]
    docs = [{"prompt": passkey_prompt(k, 3 + i, 2), "mc_prompt": passkey_prompt(k, 3 + i, 2, "\nAnswer:"), "key": k,
             "choices": [f" {k}", f" {keys[i - 1]}"], "gold": 0}
            for i, k in enumerate(keys)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\n"
    (tmp_path / "gen.yaml").write_text(
        "task: deci_passkey_gen\noutput_type: generate_until\n" + common
        + "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{key}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: regex\n        regex_pattern: \"(\\\\d+)\"\n"
        "      - function: take_first\n")
    (tmp_path / "mc.yaml").write_text(
        "task: deci_passkey_mc\noutput_type: multiple_choice\n" + common + "doc_to_text: \"{{mc_prompt}}\"\n"
        + "target_delimiter: \"\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    out = lm_eval.simple_evaluate(
        model="decimamba", model_args={"pretrained": CKPT, "device": "cpu", **DECI_ARGS},
        tasks=["deci_passkey_gen", "deci_passkey_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    model = DecimatingMambaModel.from_pretrained(CKPT, decimation_config=DECI)
    correct_mc = 0
    for s in sorted(out["samples"]["deci_passkey_mc"], key=lambda s: s["doc_id"]):
        d = docs[s["doc_id"]]
        lls = [direct_loglikelihood(model, tok, d["mc_prompt"], c)[0] for c in d["choices"]]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(lls, abs=LL_TOL)
        correct_mc += lls[0] > lls[1]
    assert out["results"]["deci_passkey_mc"]["acc,none"] == pytest.approx(correct_mc / len(docs))
    gen = sorted(out["samples"]["deci_passkey_gen"], key=lambda s: s["doc_id"])
    matches = [s["filtered_resps"][0] == docs[s["doc_id"]]["key"] for s in gen]
    assert out["results"]["deci_passkey_gen"]["exact_match,strip"] == pytest.approx(sum(matches) / len(docs))
    assert sum(matches) >= 2          # the shipped model finds most keys at ~150 tokens
