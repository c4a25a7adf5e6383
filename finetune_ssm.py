"""DeciMamba fine-tuning and evaluation from a JSON config (the original's command line, kept).

    python finetune_ssm.py                          # train with configs/finetune_ssm_config.json
    python finetune_ssm.py --eval 2 --device 0      # preset configs/eval_ssm_config_2.json on cuda:0
    python finetune_ssm.py --config my.json --set lr=3e-4 --set decimating_layers=[10] --device cpu
    python finetune_ssm.py --eval 4 --dry-run       # print the resolved config and exit
    python finetune_ssm.py --resume output/<run>    # continue an interrupted training run

Precedence: schema defaults <- config file <- --set <- --device. Keys: configs/schema.py
(--list-keys). Outputs go to <output_dir>/<run name>/: config.json, results.jsonl (one record per
eval cell), metrics.json, plots/, train_log.jsonl, checkpoints (best_model/, epoch_E_step_S/).

Exit status: 0 done; 1 a problem with the input, files or machine (one line); 2 a config problem;
3 training stopped before its end (signal, max_train_seconds) with a checkpoint: continue with
--resume RUN. The loop is engine/train.py, the evaluation engine/evaluate.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from configs import schema
from custom_datasets import get_task
from custom_datasets.sources import load_tokenizer
from engine import checkpoint as ckpt
from engine.errors import cli_main, read_json
from engine.evaluate import find_deci_layer, run_eval
from engine.logger import RunLogger
from engine.results import DIGEST_CACHE, weights_digest, write_json_atomic
from engine.train import EXIT_STOPPED, nothing_left, train
from engine.train import build_chunks, train_step  # noqa: F401 - re-exported for callers of the old module
from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel

REPO = os.path.dirname(os.path.abspath(__file__))
PRESET_IDS = tuple(range(7))


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ---------------------------------------------------------------------------- configuration
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=int, default=-1, help="preset id 0-6 (configs/eval_ssm_config_<id>.json); -1: train")
    p.add_argument("--device", default=None, help="'<n>' (cuda:<n>), 'cpu', 'cuda' or 'cuda:<n>'")
    p.add_argument("--config", default=None, help="any config file in the same flat format")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (JSON value)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, exit")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a training run from its latest checkpoint (--set only for schema.RESUME_SAFE keys)")
    p.add_argument("--run-name", default=None, help="run folder: one folder name under output_dir (no '/')")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder of that name first")
    p.add_argument("--fresh-eval", action="store_true",
                   help="evaluate every cell again instead of reusing recorded ones (new records are appended)")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its type and default")
    return p.parse_args(argv)


def normalize_device(dev):
    if dev is None or dev == "None":
        return None
    if dev.isdigit():
        return f"cuda:{dev}"
    if dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()):
        return dev
    raise schema.ConfigError([f"--device {dev!r}: expected an integer GPU index, 'cpu', 'cuda' or 'cuda:<n>'"], "--device")


def resolve_config(args):
    if args.eval != -1 and args.config:
        raise schema.ConfigError(["give either --eval <id> or --config <file>, not both"], "command line")
    overrides = schema.parse_set(args.set)
    notes = []
    if args.resume:
        path = resume_config_path(args)
        notes = resume_overrides(read_json(path, "restore the run's config.json (each checkpoint holds a copy, "
                                                 "finetune_ssm_config.json)"), overrides, args.resume)
    elif args.config:
        path = args.config
    elif args.eval == -1:
        path = os.path.join(REPO, "configs", "finetune_ssm_config.json")
    elif args.eval in PRESET_IDS:
        path = os.path.join(REPO, "configs", f"eval_ssm_config_{args.eval}.json")
    else:
        raise schema.ConfigError([f"--eval {args.eval}: valid preset ids are {list(PRESET_IDS)} (or -1 to train)"],
                                 "command line")
    cfg, more = schema.load(path, overrides, normalize_device(args.device))
    return cfg, notes + more, path


def resume_config_path(args) -> str:
    given = [flag for flag, on in (("--eval", args.eval != -1), ("--config", args.config),
                                   ("--run-name", args.run_name), ("--overwrite", args.overwrite)) if on]
    if given:
        raise UsageError(f"--resume continues the run in {args.resume!r} with its own config.json; {', '.join(given)} "
                         f"cannot be combined with it (to evaluate its weights: --eval N --set "
                         f"load_cp={os.path.join(args.resume, 'best_model')})")
    path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {args.resume!r}: no config.json there (is it a run folder?)")
    return path


def resume_overrides(stored: dict, overrides: dict, run: str) -> list[str]:
    """--set with --resume: keys in schema.RESUME_SAFE may change (noted); any other change is refused,
    as the run would no longer continue the same training."""
    if not isinstance(stored, dict):
        raise UsageError(f"{os.path.join(run, 'config.json')}: not a JSON object of config keys")
    defaults = schema.defaults()
    changed = {k: v for k, v in overrides.items() if k in schema.KEY_BY_NAME and stored.get(k, defaults[k]) != v}
    unsafe = [k for k in changed if k not in schema.RESUME_SAFE]
    if unsafe:
        raise UsageError(f"--resume: --set {', '.join(f'{k}={changed[k]!r}' for k in unsafe)} would change how the "
                         f"run trains, so it would not continue the same run; with --resume only "
                         f"{list(schema.RESUME_SAFE)} may change. To train on from its weights with other settings, "
                         f"start a new run: --config {os.path.join(run, 'config.json')} --set load_cp=<checkpoint> "
                         f"--set recover_step=<its step> --run-name <new name>")
    notes = [f"--resume: {k} {stored.get(k, defaults[k])!r} -> {v!r}" for k, v in changed.items()]
    if stored.get("lr_sched_type") == "cosine" and {"max_step", "epochs"} & set(changed):
        notes.append("--resume: the cosine schedule now ends at the new total step; the LR from the resumed step on "
                     "differs from the first run's plan")
    return notes


def setup_distributed(cfg) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): one process per GPU (NCCL; each on cuda:<LOCAL_RANK>) or,
    with model_device 'cpu', gloo processes. Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = cfg["model_device"].startswith("cuda")
    if on_cuda:
        cfg["model_device"] = f"cuda:{local}"
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if on_cuda else "gloo")
    return torch.distributed.get_rank(), world


def check_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"model_device={name!r} but CUDA is not available on this machine; pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"model_device={name!r} but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def decimation_config(cfg) -> dict:
    on = cfg["mamba_arch"] == "deci" and cfg["activate_decimation"]
    return dict(activate=on, record_debug_params=cfg["record_debug_params"], type=cfg["decimation_type"],
                beta=cfg["decimation_beta"], L_base=cfg["decimation_max_p_L_base"],
                decimating_layers=list(cfg["decimating_layers"]) if on else [], min_seq_len=cfg["decimation_min_seq_len"])


def check_checkpoint_depth(cfg) -> None:
    """decimating_layers and find_deci_layer_candidates against a local load_cp's depth, before anything is
    loaded (--dry-run too)."""
    cp = cfg["load_cp"]
    if not (cfg["mamba_arch"] == "deci" and cfg["activate_decimation"] and cp and os.path.isdir(cp)):
        return
    try:
        with open(os.path.join(cp, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return                                   # the loader reports a missing or damaged config.json
    n = raw.get("n_layer", raw.get("num_hidden_layers")) if isinstance(raw, dict) else None
    if not isinstance(n, int):
        return
    cands = cfg["find_deci_layer_candidates"] if cfg["find_deci_layer"] else None
    if any(i >= n for i in cands or []):
        raise UsageError(f"find_deci_layer_candidates={cands} but checkpoint {cp!r} has {n} layers (0..{n - 1}): "
                         f"sweep layers that exist, or pass null for the default sweep")
    if not any(i >= n for i in cfg["decimating_layers"]):
        return
    trained = ""
    run_cfg = os.path.join(cp, ckpt.RUN_CONFIG)
    if os.path.isfile(run_cfg):
        try:
            with open(run_cfg) as f:
                rc = json.load(f)
            trained = (f"; it was trained with --set decimating_layers={json.dumps(rc['decimating_layers'])} "
                       f"--set decimation_max_p_L_base={rc['decimation_max_p_L_base']}")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    raise UsageError(f"decimating_layers={cfg['decimating_layers']} but checkpoint {cp!r} has {n} layers (0..{n - 1}): "
                     f"pass layers that exist, e.g. --set decimating_layers=[{n // 2}] with a decimation_max_p_L_base "
                     f"that suits it{trained}, or --set activate_decimation=false to evaluate it without decimation")


def check_squad_split(cfg) -> None:
    """Evaluating a SQuAD fine-tune on the file it was trained on: the evaluation must hold out the titles
    its training held out (its run config says how many), else it scores questions the model trained on."""
    cp = cfg["load_cp"]
    if not (cfg["eval_mode"] and cfg["dataset"] == "squad_retrieve" and cp and os.path.isdir(cp)):
        return
    try:
        with open(os.path.join(cp, ckpt.RUN_CONFIG)) as f:
            rc = json.load(f)
    except (OSError, ValueError):
        return                                   # no record of its training: nothing to check against
    if not isinstance(rc, dict) or rc.get("dataset") != "squad_retrieve" or rc.get("eval_mode"):
        return
    trained, source = rc.get("squad_train_source"), cfg["squad_eval_source"]
    if not (isinstance(trained, str) and source.endswith(".json") and schema.same_squad_source(trained, source)):
        return                                   # evaluated on other data than it trained on
    held = rc.get("squad_heldout_titles", 0)
    if held and cfg["squad_heldout_titles"] == held:
        return
    fix = (f"pass --set squad_heldout_titles={held}" if held else
           "it trained on every question of that file: evaluate it on another file (squad_eval_source)")
    raise UsageError(f"checkpoint {cp!r} was fine-tuned on {source!r} with squad_heldout_titles={held}; evaluating "
                     f"it there with squad_heldout_titles={cfg['squad_heldout_titles']} would score questions it "
                     f"trained on: {fix}")


# ---------------------------------------------------------------------------- model
def build_model(cfg, tok, device, weights=None):
    cls = DecimatingMambaModel if cfg["mamba_arch"] == "deci" else MambaLMHeadModel
    deci = decimation_config(cfg)
    if weights is None and cfg["load_cp"] is None and cfg["scratch_model_config"] is not None:
        mc = MambaConfig.from_dict({"vocab_size": tok.vocab_size, **cfg["scratch_model_config"]})
        torch.manual_seed(cfg["seed"])
        model, source = cls(mc, decimation_config=deci, backend=cfg["backend"]), "scratch"
    else:
        source = weights or cfg["load_cp"] or f"state-spaces/{cfg['model_type']}"
        model = cls.from_pretrained(source, decimation_config=deci, cache_dir=cfg["cache_dir"], backend=cfg["backend"])
    if tok.vocab_size > model.config.padded_vocab_size:
        raise UsageError(f"tokenizer {cfg['tokenizer']!r} has {tok.vocab_size} tokens but model {source!r} "
                         f"only {model.config.padded_vocab_size} embedding rows")
    print(f"model: {cls.__name__} from {source}, {model.num_parameters() / 1e6:.2f}M parameters, "
          f"decimation {'on ' + str(deci['decimating_layers']) if deci['activate'] else 'off'}")
    return model.to(device), source


# ---------------------------------------------------------------------------- run folder
# Keys an evaluation may continue in its run folder with another value of: where files and logs go, wall-time
# limits, and the device (noted: every record and metrics.json name the device they were measured on).
CONTINUE_FREE = ("output_dir", "cache_dir", "activate_logging", "wandb_dir", "wandb_project", "wandb_mode",
                 "run_name_addon", "max_train_seconds", "model_device")


def plain_folder_name(name: str) -> bool:
    """One folder name: not empty, '.' or '..', no path separator (so <output_dir>/<name> is a direct child)."""
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    return name not in ("", ".", "..") and not any(c in name for c in seps) and "\0" not in name


def check_run_name(name: str | None) -> None:
    if name is not None and not plain_folder_name(name):
        raise schema.ConfigError([f"--run-name {name!r}: must be one folder name under output_dir (not empty, "
                                  f"'.' or '..', no '/' or '\\')"], "command line")


def run_name(args, cfg) -> str:
    if args.run_name is not None:
        return args.run_name
    if cfg["eval_mode"]:                 # derived from the config hash: rerunning resumes it
        tag = os.path.basename(str(cfg["load_cp"] or cfg["model_type"]).rstrip("/"))
        name = f"eval_{cfg['mamba_arch']}_{tag}_{cfg['dataset']}_{schema.config_hash(cfg)}"
    else:
        stamp = datetime.datetime.now().strftime("%Y_%m_%d__%H_%M_%S")
        name = (f"{stamp}_{cfg['mamba_arch']}_{cfg['model_type']}_{cfg['dataset']}_seed_{cfg['seed']}"
                f"{cfg['run_name_addon']}")
    if not plain_folder_name(name):
        raise UsageError(f"the run name made from the config, {name!r}, is not one folder name (a value in it, "
                         f"e.g. model_type, holds a path separator): pass --run-name NAME")
    return name


def locate_run(args, cfg, world) -> tuple[str, str | None, bool]:
    """(run folder, checkpoint to resume from, whether another run's folder is there). A training
    run never writes into another run's folder (--resume continues it, --overwrite deletes it
    first); an evaluation continues in its folder with the same config (its recorded cells are
    matched by identity), never with another (continue_evaluation)."""
    resume_from = None
    if args.resume:
        run_dir = os.path.abspath(args.resume)
        resume_from = ckpt.latest_checkpoint(run_dir)           # finishes interrupted checkpoint swaps first
        if resume_from is None:
            raise UsageError(f"--resume {args.resume!r}: no epoch_*_step_* checkpoint with a training state in it")
    else:
        run_dir = os.path.abspath(os.path.join(cfg["output_dir"], run_name(args, cfg)))
    if world > 1:                               # every rank uses rank 0's run folder
        holder = [run_dir]
        torch.distributed.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    existing = not args.resume and os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if existing and not args.overwrite:
        refuse_existing(run_dir, cfg)
    return run_dir, resume_from, existing


def open_run_dir(args, cfg, run_dir, existing, rank, world) -> None:
    """Create (or --overwrite) the run folder and write the run's config.json (rank 0)."""
    if world > 1:
        torch.distributed.barrier()             # every rank has checked before rank 0 changes the folder
    if rank == 0:
        if existing and args.overwrite:
            root = os.path.abspath(cfg["output_dir"])
            if os.path.dirname(run_dir) != root or not plain_folder_name(os.path.basename(run_dir)):
                raise UsageError(f"--overwrite deletes only a run folder directly in output_dir {root}, and "
                                 f"{run_dir} is not one: nothing was deleted")
            print(f"--overwrite: deleting the earlier run folder {run_dir}")
            shutil.rmtree(run_dir)
        elif existing:
            ckpt.recover_interrupted_swaps(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "config.json"), cfg)
        print(f"run folder: {run_dir}")


def refuse_existing(run_dir: str, cfg) -> None:
    stored_path = os.path.join(run_dir, "config.json")
    stored = None
    if os.path.isfile(stored_path):
        try:
            with open(stored_path) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            stored = None
    if cfg["eval_mode"] and isinstance(stored, dict) and stored.get("eval_mode") is True:
        continue_evaluation(run_dir, stored, cfg)
        return
    what = "an evaluation" if cfg["eval_mode"] else "training"
    raise UsageError(f"run folder {run_dir} already holds a run; {what} into it would replace its files: continue it "
                     f"with --resume {run_dir}, choose another --run-name, or pass --overwrite to delete it first")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def continue_evaluation(run_dir: str, stored: dict, cfg) -> None:
    """An evaluation into a folder that holds one: the same resolved config continues it (recorded cells are
    reused); another config is refused, as its metrics.json, plots and train_log.jsonl rows would replace or
    mix with the earlier evaluation's, unless the folder holds nothing but config.json (a run that stopped
    before it evaluated anything)."""
    skip = set(CONTINUE_FREE)
    if cfg["find_deci_layer"] and stored.get("find_deci_layer"):
        skip.add("decimating_layers")            # the sweep's choice, written into config.json after it
    changed = schema.changed_keys(stored, cfg, skip)
    recorded = [f for f in os.listdir(run_dir) if f != "config.json"]
    if changed and recorded:
        base = schema.defaults()
        shown = "; ".join(f"{k} {_short(stored.get(k, base[k]))} -> {_short(cfg[k])}" for k in changed[:3])
        more = f" and {len(changed) - 3} more key(s)" if len(changed) > 3 else ""
        raise UsageError(f"run folder {run_dir} holds an evaluation with other settings ({shown}{more}); evaluating "
                         f"into it would replace its metrics.json and plots: pass another --run-name, or --overwrite "
                         f"to delete it first")
    if changed:
        print(f"note: {os.path.join(run_dir, 'config.json')}: replaced by this run's config (the folder holds no "
              f"result of the earlier one; changed: {', '.join(changed)})")
    if stored.get("model_device") != cfg["model_device"]:
        print(f"note: continuing the evaluation in {run_dir} on {cfg['model_device']} (it ran on "
              f"{stored.get('model_device')!r}): each record names its device; metrics.json and the plots will "
              f"describe this run's")


# ---------------------------------------------------------------------------- main
def run(args) -> int:
    if args.list_keys:
        print(schema.describe_keys())
        return 0
    cfg, notes, source = resolve_config(args)
    print(f"config: {source} (precedence: schema defaults <- file <- --set <- --device)")
    check_run_name(args.run_name)
    check_checkpoint_depth(cfg)
    check_squad_split(cfg)
    if args.dry_run:
        print(json.dumps(cfg, indent=2))
        for note in notes:
            print(f"note: {note}")
        return 0
    rank, world = setup_distributed(cfg)
    for note in notes if rank == 0 else []:
        print(f"note: {note}")
    device = check_device(cfg["model_device"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    run_dir, resume_from, existing = locate_run(args, cfg, world)
    tok = load_tokenizer(cfg["tokenizer"], cfg["cache_dir"])
    task = get_task(cfg["dataset"])(cfg, tok, train=not cfg["eval_mode"])
    if resume_from:                    # before the run's config.json takes the new --set values
        done = nothing_left(cfg, task, int(re.search(r"step_(\d+)$", resume_from).group(1)))
        if done:
            print(done)
            return 0
    open_run_dir(args, cfg, run_dir, existing, rank, world)
    if cfg["record_debug_params"]:
        task.artifact_dir = os.path.join(run_dir, "artifacts")
    model, source = build_model(cfg, tok, device, weights=resume_from)
    weights = None                               # a loaded checkpoint: its files' digest; else the parameters'
    if rank == 0 and source != "scratch" and not resume_from:
        weights = weights_digest(source, cfg["cache_dir"], os.path.join(os.path.dirname(run_dir), DIGEST_CACHE))
    logger = RunLogger(cfg, run_dir, os.path.basename(run_dir)) if rank == 0 else None
    try:
        start = cfg["recover_step"] or 0
        if rank == 0 and cfg["find_deci_layer"] and not resume_from:
            find_deci_layer(task, model, cfg, run_dir, device, weights, args.fresh_eval)
            write_json_atomic(os.path.join(run_dir, "config.json"), cfg)
        if rank == 0 and not resume_from:
            score = run_eval(task, model, cfg, run_dir, device, source if cfg["eval_mode"] else f"step_{start}", start,
                             "Initial Result", weights, args.fresh_eval)
            logger.log({"score": score}, start)
        if world > 1:
            holder = [list(model.decimation.decimating_layers)]     # find_deci_layer's choice, everywhere
            torch.distributed.broadcast_object_list(holder, src=0)
            model.decimation.decimating_layers = holder[0]
        if cfg["eval_mode"]:
            return 0
        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        result = train(cfg, net, tok, task, run_dir, device, logger, resume_from, rank, world, args.fresh_eval)
        return report(result, task, run_dir, rank)
    finally:
        if logger is not None:
            logger.finish()
        if world > 1:
            torch.distributed.destroy_process_group()


def report(result, task, run_dir: str, rank: int) -> int:
    """Print how training ended; the exit status: 0 finished, EXIT_STOPPED stopped with a checkpoint."""
    if result.stopped is None:
        if rank == 0:
            best = "none (no evaluation during training)" if result.best is None else result.best
            print(f"training done at step {result.step}; best {task.primary_metric}: {best}")
        return 0
    if rank == 0:
        if result.checkpoint:
            print(f"stopped at step {result.step} of {result.total} ({result.stopped}); checkpoint {result.checkpoint}; "
                  f"continue with: python finetune_ssm.py --resume {run_dir}", flush=True)
        else:
            print(f"stopped at step {result.step} of {result.total} ({result.stopped}) before any checkpoint was "
                  f"written: start again (--overwrite reuses the run name)", file=sys.stderr, flush=True)
    return EXIT_STOPPED if result.checkpoint else 1


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return cli_main(run, args, usage_errors=(schema.ConfigError,), errors=(UsageError, OSError, ValueError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
