"""Typed schema of the run configuration: the original 51 flat keys plus ours.

The original files (``finetune_ssm_config.json``, ``eval_ssm_config_{0..6}.json``) load unchanged
and mean what they meant. Every key is declared once here with its type, default, check and a
one-line description (reference spec §1.3). Loading collects every problem (unknown keys with
close matches, wrong types, out-of-range values, contradictions) and raises one ConfigError.
Keys that are inert in a mode are kept as stored and reported as notes, never rewritten.
Precedence: schema defaults <- file <- --set <- --device.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from custom_datasets import TASK_NAMES  # the one task registry


class ConfigError(ValueError):
    """Every problem of a config, one per line."""

    def __init__(self, problems: list[str], source: str = "config", hint: str = ""):
        self.problems = problems
        if len(problems) == 1:                    # one problem: one line
            text = f"{source}: {problems[0]}" + (f" ({hint})" if hint else "")
        else:
            text = (f"{source} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
                    + (f"\n{hint}" if hint else ""))
        super().__init__(text)


@dataclass(frozen=True)
class Key:
    name: str
    type: str                     # int, float, bool, str, list[int], list[float], dict; "?" suffix: nullable
    default: Any
    doc: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""                # what check enforces, for messages
    original: bool = True         # one of the original 51 keys


def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


def _nonempty(v):
    return v.strip() != ""


def _device(v):
    return v in ("cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())


def _no_path_separator(v):
    return "/" not in v and "\\" not in v


WIKITEXT_SPLITS = ("train", "validation", "test")


K = Key
KEYS: list[Key] = [
    # --- run, output, logging
    K("output_dir", "str", "./output", "root folder of run directories (checkpoints, results, plots)", _nonempty, "a folder path"),
    K("cache_dir", "str", "./hf_cache", "Hugging Face cache for hub models and datasets"),
    K("activate_logging", "bool", True, "log to wandb (lazy import; offline unless WANDB_API_KEY or wandb_mode says otherwise)"),
    K("wandb_dir", "str", "./wandb", "wandb run files"),
    K("run_name_addon", "str", "", "suffix of the run name", _no_path_separator, "without '/' or '\\' (it is part of one folder name)"),
    K("record_debug_params", "bool", False, "record A, B, C, Δ and kept indices per layer during passkey eval (eval 6)"),
    K("recover_step", "int?", None, "skip the first N batches of epoch 0 (prefer --resume, which restores everything)", _nonneg, ">= 0"),
    K("eval_mode", "bool", False, "only run the initial evaluation"),
    K("mamba_arch", "str", "deci", "'deci' (DecimatingMambaModel) or 'vanilla' (MambaLMHeadModel)", lambda v: v in ("deci", "vanilla"), "one of ['deci', 'vanilla']"),
    K("model_type", "str", "mamba-130m", "base weights state-spaces/<model_type> when load_cp is null", _nonempty, "non-empty"),
    K("use_finetuned_model", "bool", False, "unused (kept for compatibility)"),
    K("load_cp", "str?", None, "checkpoint to load: hub id or local directory", _nonempty, "a hub id or a local directory (null: state-spaces/<model_type>)"),
    K("clip_grad", "bool", True, "clip the total gradient norm"),
    K("clip_grad_max_norm", "float", 1, "clipping threshold", _pos, "> 0"),
    K("seed", "int", 123, "seed of every RNG", lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1] (numpy's seed range)"),
    K("lr_sched_type", "str", "const", "'const', or 'cosine' (linear warmup then cosine to 0)", lambda v: v in ("const", "cosine"), "one of ['const', 'cosine']"),
    K("save_steps", "int", 100, "periodic checkpoint interval in optimizer steps", _pos, "> 0"),
    K("eval_steps", "int", 20, "evaluation interval in optimizer steps", _pos, "> 0"),
    K("grad_flow_steps", "int", 10, "interval of per-layer relative gradient-size logging", _pos, "> 0"),
    K("max_step", "int", 20000, "stop after this many optimizer steps", _nonneg, ">= 0"),
    K("epochs", "int", 10, "epochs over the training set", _pos, "> 0"),
    K("model_device", "str", "cuda:0", "'cpu', 'cuda' or 'cuda:<n>'", _device, "'cpu', 'cuda' or 'cuda:<n>' (e.g. cuda:0)"),
    K("dataset", "str", "niah_custom", "task", lambda v: v in TASK_NAMES, f"one of {list(TASK_NAMES)}"),
    K("train_set_size", "int", 6144, "unused (kept for compatibility)"),
    K("eval_set_size", "int", 20, "SQuAD: number of evaluation questions", _pos, "> 0"),
    K("eval_samples_to_log", "int", 10, "evaluation rows kept for the prediction log", _nonneg, ">= 0"),
    K("log_eval_predictions_steps", "int", 10, "log prediction rows when step % this == 0", _pos, "> 0"),
    K("eval_max_len", "int", 10, "max new tokens in greedy generation", _pos, "> 0"),
    K("max_train_input_len", "int", 20000, "drop training samples longer than this (tokens)", _pos, "> 0"),
    # --- passkey
    K("niah_train_set_size", "int", 6144, "passkeys in the training set", _pos, "> 0"),
    K("niah_context_len_train", "int", 2000, "haystack tokens of training samples", _pos, "> 0"),
    K("niah_needle_depths_eval", "list[float]", [0, 0.25, 0.5, 0.75, 1], "needle depths evaluated", lambda v: v and all(0 <= x <= 1 for x in v), "non-empty, each in [0, 1]"),
    K("niah_context_lens_eval", "list[int]", [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000], "haystack lengths evaluated", lambda v: v and all(x > 0 for x in v), "non-empty, each > 0"),
    # --- PG-19
    K("ppl_test_context_len_train", "int", 2000, "PG-19 training window", _pos, "> 0"),
    K("ppl_test_num_windows_per_context_len_eval", "int", 10, "windows per book per context length", _pos, "> 0"),
    K("ppl_test_context_lens_eval", "list[int]", [1000, 2000, 4000, 10000, 20000, 30000, 40000, 50000, 60000], "PPL window lengths", lambda v: v and all(x > 0 for x in v), "non-empty, each > 0"),
    K("ppl_test_pred_len", "int", 100, "scored tokens at the end of each eval window", _pos, "> 0"),
    K("deci_num_chunks", "int", 2, "chunks per PG-19 training window (used only for decimating PG-19 training)", _pos, "> 0"),
    # --- SQuAD
    K("multidoc_num_noise_docs_train", "int", 11, "noise documents per training sample", lambda v: 0 <= v <= 999, "in [0, 999]"),
    K("multidoc_num_noise_docs_eval", "list[int]", [10, 20, 40, 80, 120, 160, 200], "noise-document counts evaluated", lambda v: v and all(0 <= x <= 999 for x in v), "non-empty, each in [0, 999]"),
    K("multidoc_noise_injection_policy", "str", "random_loc", "'random_loc' (golden at a pseudo-random slot) or 'first'", lambda v: v in ("random_loc", "first"), "one of ['random_loc', 'first']"),
    # --- decimation
    K("activate_decimation", "bool", True, "master switch (needs mamba_arch 'deci')"),
    K("decimation_type", "str", "max_p", "selection rule; only 'max_p'", lambda v: v == "max_p", "'max_p'"),
    K("decimation_beta", "float", 0.5, "β: budget shrink per decimating layer", lambda v: 0 < v <= 1, "in (0, 1]"),
    K("decimating_layers", "list[int]", [12], "0-based decimating layers", lambda v: all(x >= 0 for x in v) and len(set(v)) == len(v), "distinct, each >= 0"),
    K("decimation_min_seq_len", "int", 20, "minimum kept non-response tokens", _nonneg, ">= 0"),
    K("decimation_max_p_L_base", "float", 2000, "L_base: budget at the first decimating layer", _pos, "> 0"),
    K("find_deci_layer", "bool", False, "sweep the decimating layer on the eval set before training"),
    # --- optimisation
    K("lr", "float", 1e-4, "AdamW learning rate", _pos, "> 0"),
    K("weight_decay", "float", 0.1, "AdamW weight decay", _nonneg, ">= 0"),
    K("grad_accum_steps", "int", 32, "samples per optimizer step", _pos, "> 0"),
    # ===== keys added by this project (defaults reproduce the original, bugs aside) =====
    K("tokenizer", "str", "EleutherAI/gpt-neox-20b", "hub id, local tokenizer.json, or a directory holding one", _nonempty, "a hub id, a tokenizer.json or a directory holding one", original=False),
    K("scratch_model_config", "dict?", None, "MambaConfig fields: train a randomly initialised model instead of loading weights", original=False),
    K("backend", "str", "auto", "scan path: 'auto', 'torch' or 'kernel'", lambda v: v in ("auto", "torch", "kernel"), "one of ['auto', 'torch', 'kernel']", original=False),
    K("eval_prefill_chunk_size", "int?", None, "generation tasks: stream each prompt through prefill in chunks of this many tokens (flat memory, e.g. 32768 for 10M-token prompts; same answers as one shot up to fp rounding); null: one shot", _pos, "> 0", original=False),
    K("eval_batch_tokens", "int", 1 << 21, "the passkey task: at most this many prompt tokens in one batched prefill (lower it to run several evaluations on one GPU; rows are independent, so scores change only by rounding)", _pos, "> 0", original=False),
    K("train_micro_batch_size", "int", 8, "samples of equal length run in one forward during accumulation", _pos, "> 0", original=False),
    K("max_train_seconds", "float?", None, "stop training after this wall time, saving a checkpoint (null: no limit)", _pos, "> 0", original=False),
    K("warmup_steps", "int", 0, "linear LR warmup steps", _nonneg, ">= 0", original=False),
    K("weight_decay_all_params", "bool", False, "decay A_log, D, norms and biases too (the original's behaviour)", original=False),
    K("niah_noise_dataset", "str", "wikitext/wikitext-2-raw-v1", "haystack text: 'wikitext/<config>' (hub; bundled copy for test/validation) or a directory of wiki.<split>.raw files", original=False),
    K("niah_noise_split_train", "str", "train", "haystack split for training", lambda v: v in WIKITEXT_SPLITS, f"one of {list(WIKITEXT_SPLITS)}", original=False),
    K("niah_noise_split_eval", "str", "test", "haystack split for evaluation", lambda v: v in WIKITEXT_SPLITS, f"one of {list(WIKITEXT_SPLITS)}", original=False),
    K("niah_context_len_train_curriculum", "list[int]?", None, "haystack tokens per epoch before niah_context_len_train (epoch i uses entry i; e.g. [256, 512, 1024]); null: none", lambda v: all(x > 0 for x in v), "each > 0", original=False),
    K("niah_samples_per_cell", "int", 1, "passkey samples per (depth, length) cell (the paper: 1)", _pos, "> 0", original=False),
    K("niah_answer_as_in_context", "bool", False, "train on the key's tokens as they appear in the haystack (' 7','14','32') instead of the original's standalone encoding ('714','32'): a pure copy, learnable from scratch; scoring is unchanged", None, "", original=False),
    K("niah_depth_window", "float", 0.1, "needle lands within depth ± this", lambda v: 0 < v <= 0.5, "in (0, 0.5]", original=False),
    K("squad_train_source", "str", "rajpurkar/squad_v2:train", "'<hub id>:<split>' or a local SQuAD-format .json", original=False),
    K("squad_eval_source", "str", "rajpurkar/squad_v2:validation", "'<hub id>:<split>' or a local SQuAD-format .json", original=False),
    K("squad_heldout_titles", "int", 0, "one local SQuAD .json as both sources: this many of its titles (fixed seed) hold the evaluation questions, the rest the training ones (no question or paragraph in both); 0: no split", lambda v: v >= 0, ">= 0", original=False),
    K("squad_index_dir", "str", "custom_datasets/multidoc_squad", "the original index arrays (.npy) for the hub splits", original=False),
    K("multidoc_original_format", "bool", False, "the original's prompt end (a lone space token) and standalone labels (bug B5), to reproduce the released checkpoints' numbers", original=False),
    K("multidoc_dedup_noise", "bool", True, "never repeat a paragraph (or the golden one) as noise in a sample", original=False),
    K("pg19_dir", "str", "artifacts/ppl_test/pg19", "folder of {train,test}_set.pt written by custom_datasets/tokenize_pg19.py", original=False),
    K("ppl_test_max_books", "int?", None, "evaluate at most this many books (null: all)", _pos, "> 0", original=False),
    K("lm_corpus_dir", "str", "artifacts/lm_corpus", "lm_corpus: folder of <split>.<tag>.bin/.json shards written by custom_datasets/tokenize_corpus.py", original=False),
    K("lm_context_len_train", "int", 2048, "lm_corpus: training window (tokens)", _pos, "> 0", original=False),
    K("lm_train_samples_per_epoch", "int?", None, "lm_corpus: windows per epoch (null: train tokens // lm_context_len_train)", _pos, "> 0", original=False),
    K("lm_eval_split", "str", "validation", "lm_corpus: split evaluated during training", original=False),
    K("lm_eval_context_lens", "list[int]", [2048], "lm_corpus: evaluated window lengths", lambda v: v and all(x > 1 for x in v), "non-empty, each > 1", original=False),
    K("lm_eval_windows", "int", 32, "lm_corpus: evaluation windows per length, spread evenly over the split", _pos, "> 0", original=False),
    K("find_deci_layer_candidates", "list[int]?", None, "layers swept by find_deci_layer (null: 8..n_layer-1, or all if n_layer <= 8)", lambda v: all(x >= 0 for x in v), "layer numbers, each >= 0", original=False),
    K("wandb_project", "str", "icl_ssm", "wandb project", original=False),
    K("wandb_mode", "str?", None, "wandb mode: 'online', 'offline' or 'disabled' (null: online only if WANDB_API_KEY is set)", lambda v: v in ("online", "offline", "disabled"), "one of ['online', 'offline', 'disabled']", original=False),
]
KEY_BY_NAME = {k.name: k for k in KEYS}
ORIGINAL_KEYS = [k.name for k in KEYS if k.original]
assert len(ORIGINAL_KEYS) == 51, len(ORIGINAL_KEYS)


def _type_ok(spec: str, v) -> bool:
    if spec.endswith("?"):
        if v is None:
            return True
        spec = spec[:-1]
    if spec == "bool":
        return isinstance(v, bool)
    if spec == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if spec == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if spec == "str":
        return isinstance(v, str)
    if spec == "dict":
        return isinstance(v, dict)
    if spec.startswith("list["):
        inner = spec[5:-1]
        return isinstance(v, list) and all(_type_ok(inner, x) for x in v)
    raise AssertionError(spec)


def defaults() -> dict:
    return {k.name: (list(k.default) if isinstance(k.default, list) else k.default) for k in KEYS}


# Float keys whose infinity means something (every other float must be finite).
INFINITY_ALLOWED = {"decimation_max_p_L_base": "inf: the budget keeps every token (modules/decimation.py)"}


def _finite(k: Key, v) -> bool:
    if not k.type.startswith(("float", "list[float]")) or v is None:
        return True
    values = v if isinstance(v, list) else [v]
    return all(math.isfinite(x) or (k.name in INFINITY_ALLOWED and x == math.inf) for x in values)


def _as_typed(v) -> str:
    """A --set value as it was typed: parse_set keeps text that is not JSON as a plain string."""
    if isinstance(v, str):
        try:
            json.loads(v)
        except json.JSONDecodeError:
            return v
    return json.dumps(v)


def _key_problems(cfg: dict, from_set) -> tuple[list[str], bool]:
    """(problems of single keys, whether every one of them came from --set)."""
    keys = [name for name in cfg if name not in KEY_BY_NAME]          # the keys with a problem
    problems = [f"unknown key {name!r} ({_suggest(name)})" for name in keys]
    for k in KEYS:
        if k.name not in cfg:
            continue
        v = cfg[k.name]
        shown = f"--set {k.name}={_as_typed(v)}" if k.name in from_set else f"{k.name}={v!r}"
        if not _type_ok(k.type, v):
            problems.append(f"{shown}: expected {k.type.replace('?', ' or null')}")
        elif not _finite(k, v):
            problems.append(f"{shown}: must be a finite number")
        elif v is not None and k.check is not None and not k.check(v):
            problems.append(f"{shown}: must be {k.rule}")
        else:
            continue
        keys.append(k.name)
    return problems, bool(keys) and all(name in from_set for name in keys)


def validate(cfg: dict, source: str = "config", from_set=()) -> list[str]:
    """Return notes on inert keys; raise ConfigError listing every problem. from_set: the keys --set gave
    (their problems name the --set value; all of them from --set: the error's source is the command line)."""
    problems, all_set = _key_problems(cfg, from_set)
    hint = "python finetune_ssm.py --list-keys prints every key with its type and default" if any(
        p.startswith("unknown key") for p in problems) else ""
    if problems:
        raise ConfigError(problems, "command line" if all_set else source, hint)
    deci = cfg["mamba_arch"] == "deci"
    if cfg["activate_decimation"] and not deci:
        problems.append("activate_decimation is true but mamba_arch is 'vanilla' (a vanilla model never decimates): "
                        "set activate_decimation false or mamba_arch 'deci'")
    if cfg["find_deci_layer"] and not (deci and cfg["activate_decimation"]):
        problems.append("find_deci_layer needs mamba_arch 'deci' with activate_decimation true")
    if math.isinf(cfg["decimation_max_p_L_base"]) is False and cfg["decimation_max_p_L_base"] < 1:
        problems.append(f"decimation_max_p_L_base={cfg['decimation_max_p_L_base']!r}: must be >= 1")
    if cfg["record_debug_params"] and cfg["dataset"] != "niah_custom":
        problems.append("record_debug_params is only supported with dataset 'niah_custom' (as in the original)")
    problems += _squad_problems(cfg)
    scratch = cfg["scratch_model_config"] is not None and cfg["load_cp"] is None
    if scratch:
        problems += _scratch_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    notes = []
    if cfg["scratch_model_config"] is not None and not scratch:
        notes.append("scratch_model_config is inert (load_cp is set: its weights are loaded)")
    if cfg["deci_num_chunks"] != 1 and not (deci and cfg["dataset"] == "ppl_test"):
        notes.append(f"deci_num_chunks={cfg['deci_num_chunks']} is inert here (used only for decimating PG-19 training)")
    if not (deci and cfg["activate_decimation"]):
        notes.append("decimation_* keys and decimating_layers are inert (decimation off)")
    if cfg["dataset"] == "squad_retrieve" and cfg["eval_mode"] and _same_squad_source(cfg) and not cfg["squad_heldout_titles"]:
        notes.append("squad_heldout_titles is 0: every question of the file is evaluated; for a checkpoint fine-tuned on "
                     "this file, set the squad_heldout_titles it was trained with (a local checkpoint's run config is checked)")
    notes.append("use_finetuned_model and train_set_size are unused (kept for compatibility)")
    return notes


def same_squad_source(a: str, b: str) -> bool:
    """Two squad_*_source values name the same data (./x.json and ../dir/x.json may name one file)."""
    if a.endswith(".json") and b.endswith(".json"):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _same_squad_source(cfg: dict) -> bool:
    return same_squad_source(cfg["squad_train_source"], cfg["squad_eval_source"])


def _squad_problems(cfg: dict) -> list[str]:
    """One SQuAD file as both sources trains on the evaluation questions unless split by title."""
    if cfg["dataset"] != "squad_retrieve":
        return []
    same, local = _same_squad_source(cfg), cfg["squad_eval_source"].endswith(".json")
    if cfg["squad_heldout_titles"] and not (same and local):
        return [f"squad_heldout_titles={cfg['squad_heldout_titles']} splits one local .json used as both "
                f"squad_train_source and squad_eval_source (got {cfg['squad_train_source']!r} and {cfg['squad_eval_source']!r})"]
    if same and not cfg["squad_heldout_titles"] and not cfg["eval_mode"]:
        fix = ("set squad_heldout_titles (e.g. 6) to split the file by title" if local else
               "train on the hub's train split (squad_train_source='rajpurkar/squad_v2:train')")
        return [f"squad_train_source and squad_eval_source are the same ({cfg['squad_eval_source']!r}): training would see "
                f"the evaluation questions; {fix}"]
    return []


# Wrong names people type for a key, when the spelling is too far off for difflib to find it.
ALIASES = {"learning_rate": "lr", "device": "model_device", "batch_size": "grad_accum_steps",
           "micro_batch_size": "train_micro_batch_size", "num_epochs": "epochs", "checkpoint": "load_cp",
           "model": "load_cp", "task": "dataset", "steps": "max_step", "max_steps": "max_step"}


def _suggest(name: str) -> str:
    """'did you mean ...?' for an unknown key: close spellings, an alias, or keys sharing a word."""
    close = difflib.get_close_matches(name, KEY_BY_NAME, n=3, cutoff=0.6)
    if not close and name.lower() in ALIASES:
        close = [ALIASES[name.lower()]]
    if not close:
        words = {w for w in name.lower().split("_") if len(w) >= 3}
        sharing = [k for k in KEY_BY_NAME if words & set(k.split("_"))]
        close = sorted(sharing, key=lambda k: -difflib.SequenceMatcher(None, name, k).ratio())[:3]
    if not close:
        return "no key is close"
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"


def _scratch_problems(cfg: dict) -> list[str]:
    """scratch_model_config checked as the model will be built (MambaConfig), before any run starts."""
    from dataclasses import MISSING, fields

    from models.config import MambaConfig

    given = cfg["scratch_model_config"]
    for f in fields(MambaConfig):                   # container fields first: MambaConfig assumes their type
        kind = f.default_factory() if f.default_factory is not MISSING else None
        if isinstance(kind, (dict, list)) and f.name in given and not isinstance(given[f.name], type(kind)):
            return [f"scratch_model_config.{f.name}={given[f.name]!r}: expected a JSON "
                    f"{'object' if isinstance(kind, dict) else 'list'}"]
    try:
        mc = MambaConfig.from_dict({"vocab_size": 50277, **given})   # vocab_size: the tokenizer's, at run time
    except (ValueError, TypeError, AttributeError) as exc:
        return [f"scratch_model_config={given!r}: {exc}"]
    problems = []
    if cfg["mamba_arch"] == "deci" and cfg["activate_decimation"]:
        bad = [i for i in cfg["decimating_layers"] if i >= mc.n_layer]
        if bad:
            problems.append(f"decimating_layers={cfg['decimating_layers']!r}: layers {bad} do not exist in the "
                            f"scratch model (n_layer={mc.n_layer}: layers 0..{mc.n_layer - 1})")
    bad = [i for i in cfg["find_deci_layer_candidates"] or [] if i >= mc.n_layer]
    if bad:
        problems.append(f"find_deci_layer_candidates: layers {bad} do not exist in the scratch model "
                        f"(n_layer={mc.n_layer})")
    return problems


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load(path: str | None, overrides: dict | None = None, device: str | None = None) -> tuple[dict, list[str]]:
    """defaults <- file <- overrides (--set) <- device (--device). Returns (config, notes)."""
    cfg = defaults()
    source = path or "defaults"
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(["a folder, not a file: --config needs a JSON config file "
                               "(e.g. configs/demo_config.json)"], source)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f, object_pairs_hook=_reject_duplicates)
        except FileNotFoundError:
            raise ConfigError([f"config file {path!r} does not exist"], source) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"not UTF-8 text (byte {exc.start})"], source) from None
        except json.JSONDecodeError as exc:
            raise ConfigError([f"not valid JSON: {exc}"], source) from None
        except _DuplicateKey as exc:
            raise ConfigError([f"key {exc.args[0]!r} appears more than once (JSON would keep only the last): "
                               f"keep one"], source) from None
        if not isinstance(data, dict):
            raise ConfigError(["top level must be a JSON object of flat keys"], source)
        cfg.update(data)
    cfg.update(overrides or {})
    if device is not None:
        cfg["model_device"] = device
    return cfg, validate(cfg, source, from_set=set(overrides or {}) - ({"model_device"} if device else set()))


def parse_set(items: list[str]) -> dict:
    """--set key=value pairs; values parse as JSON, else as a plain string."""
    out, problems = {}, []
    for item in items or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    if problems:
        raise ConfigError(problems, "--set")
    return out


# Keys --resume accepts a new value for: they change when or how long the run trains, where it logs
# or runs, or how it is evaluated, not what one optimizer step does (the run stays one run).
RESUME_SAFE = ("max_step", "epochs", "max_train_seconds", "eval_steps", "save_steps", "grad_flow_steps",
               "activate_logging", "wandb_dir", "wandb_project", "wandb_mode", "model_device", "backend",
               "cache_dir", "eval_prefill_chunk_size", "eval_batch_tokens", "log_eval_predictions_steps", "eval_samples_to_log",
               "train_micro_batch_size")


def config_hash(cfg: dict) -> str:
    """Hash of the keys that can change a score: every key but paths, logging, the device (recorded
    beside each result) and wall-time limits. backend and eval_prefill_chunk_size are in it (another
    scan path or prefill chunking changes scores by rounding)."""
    skip = {"output_dir", "cache_dir", "activate_logging", "wandb_dir", "run_name_addon", "model_device",
            "wandb_project", "wandb_mode", "eval_mode", "recover_step", "max_train_seconds"}
    blob = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in skip}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def changed_keys(old: dict, new: dict, ignore=()) -> list[str]:
    """Schema keys whose value differs between two resolved configs (a key ``old`` lacks: its default)."""
    base = defaults()
    return [k.name for k in KEYS
            if k.name not in ignore and old.get(k.name, base[k.name]) != new.get(k.name, base[k.name])]


def describe_keys() -> str:
    rows = [f"{k.name:42s} {k.type:12s} default={json.dumps(k.default)}\n    {k.doc}" for k in KEYS]
    return "\n".join(rows)
