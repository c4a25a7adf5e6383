"""Write the repository's own passkey prompts (niah_custom: WikiText-2 test haystack, depth 0.5) as
an lm-eval task, so the shipped checkpoint can be run through lm-eval on the task it was trained for.

    python benchmarks/results/lm_eval/make_passkey_task.py OUT_DIR [--lengths 2000 8000] [--samples 5]

OUT_DIR gets, per length L, passkey_L.jsonl and deci_passkey_L.yaml (task deci_passkey_L, tag
deci_passkey: ``--include_path OUT_DIR --tasks deci_passkey``).
The prompts are our token ids decoded to text; lm-eval re-tokenises them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from configs import schema  # noqa: E402
from custom_datasets.niah import NiahTask  # noqa: E402
from custom_datasets.sources import BUNDLED_TOKENIZER, load_tokenizer  # noqa: E402

YAML = """task: deci_passkey_{length}
tag: [deci_passkey]
output_type: generate_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{key}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: digits
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = {**schema.defaults(), "niah_noise_split_eval": "test", "niah_samples_per_cell": args.samples}
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    task = NiahTask(cfg, tok, train=False)
    os.makedirs(args.out, exist_ok=True)
    for length in args.lengths:
        prompts, answers, _ = task.eval_prompts(0.5, length)
        data = os.path.join(args.out, f"passkey_{length}.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for p, a in zip(prompts, answers):
                f.write(json.dumps({"prompt": tok.decode(p), "key": a, "ctx_len": length}) + "\n")
        with open(os.path.join(args.out, f"deci_passkey_{length}.yaml"), "w", encoding="utf-8") as f:
            f.write(YAML.format(data=data, length=length))   # the path as given: relative to where lm-eval runs
        print(f"{data}: {len(prompts)} prompts of {length} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
