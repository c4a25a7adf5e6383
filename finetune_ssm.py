"""DeciMamba fine-tuning and evaluation from a JSON config (the original's command line, kept).

    python finetune_ssm.py                          # train with configs/finetune_ssm_config.json
    python finetune_ssm.py --eval 2 --device 0      # preset configs/eval_ssm_config_2.json on cuda:0
    python finetune_ssm.py --config my.json --set lr=3e-4 --set decimating_layers=[10] --device cpu
    python finetune_ssm.py --eval 4 --dry-run       # print the resolved config and exit
    python finetune_ssm.py --resume output/<run>    # continue an interrupted training run

Precedence: schema defaults <- config file <- --set <- --device. Keys: configs/schema.py
(--list-keys). Outputs go to <output_dir>/<run name>/: config.json, results.jsonl (one record per
eval cell), metrics.json, plots/, train_log.jsonl, checkpoints (best_model/, epoch_E_step_S/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs import schema
from custom_datasets import get_task
from custom_datasets.sources import load_tokenizer
from engine import checkpoint as ckpt
from engine.evaluate import evaluate
from engine.logger import RunLogger
from engine.optim import make_scheduler, param_groups
from engine.results import write_json_atomic
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
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a training run from its latest checkpoint")
    p.add_argument("--run-name", default=None, help="run folder name under output_dir")
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
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise UsageError(f"--resume {args.resume!r}: no config.json there (is it a run folder?)")
    elif args.config:
        path = args.config
    elif args.eval == -1:
        path = os.path.join(REPO, "configs", "finetune_ssm_config.json")
    elif args.eval in PRESET_IDS:
        path = os.path.join(REPO, "configs", f"eval_ssm_config_{args.eval}.json")
    else:
        raise schema.ConfigError([f"--eval {args.eval}: valid preset ids are {list(PRESET_IDS)} (or -1 to train)"],
                                 "command line")
    cfg, notes = schema.load(path, schema.parse_set(args.set), normalize_device(args.device))
    return cfg, notes, path


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


# ---------------------------------------------------------------------------- training
def build_chunks(task, batch, epoch, cfg, rank=0, world=1):
    """This rank's share of one optimizer step's samples, as chunks grouped by equal length."""
    groups, n_kept, lens = defaultdict(list), 0, []
    for idx in batch[rank::world]:
        chunks = task.train_item(int(idx), epoch)
        length = len(chunks[-1].input_ids)
        if length > cfg["max_train_input_len"]:
            continue
        if cfg["mamba_arch"] == "deci" and length // len(chunks) < cfg["decimation_min_seq_len"]:
            continue
        n_kept += 1
        lens.append(length)
        for c in chunks:
            groups[(len(c.input_ids), len(c.labels))].append(c)
    mbs = [(n_lab, items[i:i + cfg["train_micro_batch_size"]]) for (_, n_lab), items in groups.items()
           for i in range(0, len(items), cfg["train_micro_batch_size"])]
    return mbs, n_kept, lens


def _all_sum(values, device, world):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def train_step(model, built, cfg, device, autocast, world=1):
    """Accumulate the gradients of one optimizer step (equal-length chunks share a forward).

    The loss is the mean over the step's kept samples (dropped ones do not count, unlike the
    original, L12); with DDP each rank scales by world size, as DDP averages gradients, and
    synchronises only on its last backward.
    """
    mbs, n_kept, lens = built
    deci_chunks = cfg["deci_num_chunks"] if (cfg["mamba_arch"] == "deci" and cfg["dataset"] == "ppl_test") else 1
    kept_all, len_sum = _all_sum([n_kept, sum(lens)], device, world)
    if kept_all == 0:
        return None
    scale = world / (kept_all * deci_chunks)
    total = 0.0
    if world > 1 and not mbs:          # nothing local: a zero-loss pass keeps DDP's collectives in step
        mbs = [(0, None)]
    for i, (n_lab, mb) in enumerate(mbs):
        sync = world == 1 or i == len(mbs) - 1
        with (nullcontext() if sync else model.no_sync()):
            if mb is None:
                with autocast:
                    loss = model(torch.zeros(1, 2, dtype=torch.long, device=device), num_last_tokens=1).logits.sum() * 0
            else:
                ids = torch.tensor([c.input_ids for c in mb], device=device)
                labels = torch.tensor([c.labels for c in mb], device=device)
                with autocast:
                    logits = model(ids, num_last_tokens=n_lab + 1).logits[:, :-1]
                rows = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       reduction="none").view(len(mb), n_lab).mean(1)
                loss = rows.sum() * scale
            loss.backward()
            total += loss.item() / world
    (total,) = _all_sum([total], device, world)
    return {"loss": total, "mean_input_len": len_sum / kept_all, "kept_samples": int(kept_all)}


def grad_flow(model) -> dict:
    """Relative gradient size per layer: sqrt(Σ grad² / (Σ weight² + 1e-13))."""
    out = {}
    for i, layer in enumerate(model.backbone.layers):
        g = sum(float(p.grad.pow(2).sum()) for p in layer.parameters() if p.grad is not None)
        w = sum(float(p.detach().pow(2).sum()) for p in layer.parameters())
        out[f"grad_flow/layer_{i:02d}"] = math.sqrt(g / (w + 1e-13))
    return out


def run_eval(task, model, cfg, run_dir, device, checkpoint, step, label):
    identity = {"task": task.name, "task_version": task.version, "checkpoint": checkpoint,
                "config_hash": schema.config_hash(cfg), "step": step}
    print(f"Evaluating over {task.name}, step {step}")
    score, table, _ = evaluate(task, model, device, run_dir, identity)
    print(table)
    print(f"Validation Set - {label} | Score: {score:.3f}")
    return score


def better(task, score, best):
    if best is None or score != score:
        return best is None and score == score
    return score > best if task.higher_is_better else score < best


def find_deci_layer(task, model, cfg, run_dir, device):
    """Sweep the (single) decimating layer on the eval set; install the best layer number."""
    n = model.config.n_layer
    cands = cfg["find_deci_layer_candidates"] or (list(range(8, min(n, 25))) if n > 8 else list(range(n)))
    saved = list(model.decimation.decimating_layers)
    scores = {}
    for layer in cands:
        model.decimation.decimating_layers = [layer]
        scores[layer] = run_eval(task, model, cfg, os.path.join(run_dir, "find_deci_layer"), device,
                                 f"sweep_layer_{layer}", 0, f"decimating layer {layer}")
    pick = (max if task.higher_is_better else min)(scores, key=scores.get) if scores else saved[0]
    model.decimation.decimating_layers = [pick] if scores else saved
    write_json_atomic(os.path.join(run_dir, "find_deci_layer.json"), {"scores": scores, "chosen_layer": pick})
    print(f"find_deci_layer: scores {scores}; chosen layer {pick}")
    cfg["decimating_layers"] = [pick]


class StopRequest:
    """SIGTERM / SIGINT ask the loop to stop after the current step and save a resumable
    checkpoint (preemption, a scheduler's time limit, Ctrl-C); a second signal stops at once."""

    def __init__(self):
        self.requested, self._old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"signal {signal.Signals(signum).name}: stopping after this step (checkpoint saved); again to stop now",
              flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg, model, tok, task, run_dir, device, logger, resume_from=None, rank=0, world=1):
    with StopRequest() as stop:
        return _train(cfg, model, tok, task, run_dir, device, logger, resume_from, rank, world, stop)


def _train(cfg, model, tok, task, run_dir, device, logger, resume_from, rank, world, stop):
    """The optimisation loop; with world > 1, ``model`` is DDP-wrapped and only rank 0 evaluates,
    logs and saves."""
    from concurrent.futures import ThreadPoolExecutor

    raw = model.module if world > 1 else model
    main_rank = rank == 0
    bs = cfg["grad_accum_steps"]
    n = task.train_len()
    per_epoch = math.ceil(n / bs)
    total = min(cfg["max_step"], per_epoch * cfg["epochs"])
    opt = torch.optim.AdamW(param_groups(raw, cfg["weight_decay"], cfg["weight_decay_all_params"]), lr=cfg["lr"])
    sched = make_scheduler(opt, cfg["lr_sched_type"], cfg["warmup_steps"], total)
    step, epoch, pos, best = 0, 0, 0, None
    if resume_from:
        state = ckpt.load_training_state(resume_from)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, epoch, pos, best = state["step"], state["epoch"], state["pos"], state["best"]
        if main_rank:
            print(f"resumed from {resume_from}: step {step}, epoch {epoch}, batch {pos}, best {best}")
    elif cfg["recover_step"]:
        pos = cfg["recover_step"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not main_rank)
    t_start, time_up = time.time(), False
    pool = ThreadPoolExecutor(max_workers=1)           # builds the next step's samples meanwhile
    while step < total and epoch < cfg["epochs"]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 7919 + epoch))
        batches = perm.split(bs)
        nxt = pool.submit(build_chunks, task, batches[pos], epoch, cfg, rank, world) if pos < len(batches) else None
        for bi in range(pos, len(batches)):
            if step >= total:
                break
            built = nxt.result()
            if bi + 1 < len(batches):
                nxt = pool.submit(build_chunks, task, batches[bi + 1], epoch, cfg, rank, world)
            opt.zero_grad(set_to_none=True)
            stats = train_step(model, built, cfg, device, autocast, world)
            if stats is None:                      # every sample dropped: nothing to step on
                continue
            if main_rank and cfg["activate_logging"] and step % cfg["grad_flow_steps"] == 0:
                stats.update(grad_flow(raw))
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad_max_norm"] if cfg["clip_grad"] else float("inf"))
            opt.step()
            sched.step()
            step += 1
            stats.update(grad_norm=float(norm), lr=sched.get_last_lr()[0], epoch=epoch,
                         wall_s=round(time.time() - t_start, 3))
            over = cfg["max_train_seconds"] is not None and time.time() - t_start > cfg["max_train_seconds"]
            time_up = over or stop.requested
            if world > 1:                              # every rank stops at the same step
                time_up = _all_sum([float(time_up)], device, world)[0] > 0
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", gnorm=f"{float(norm):.2f}")
            if main_rank and step % cfg["eval_steps"] == 0:
                stats["score"] = run_eval(task, raw, cfg, run_dir, device, f"step_{step}", step,
                                          f"Epoch {epoch} | Step In Epoch {bi} | Step {step}")
                if better(task, stats["score"], best):
                    best = stats["score"]
                    ckpt.save_checkpoint(os.path.join(run_dir, "best_model"), raw, tok, cfg)
            if main_rank:
                logger.log(stats, step)
            if main_rank and (step % cfg["save_steps"] == 0 or step == total or time_up):
                state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
                         "step": step, "epoch": epoch, "pos": bi + 1, "best": best}
                ckpt.save_checkpoint(os.path.join(run_dir, f"epoch_{epoch}_step_{step}"), raw, tok, cfg, state)
            if world > 1 and (step % cfg["eval_steps"] == 0 or step % cfg["save_steps"] == 0 or time_up):
                torch.distributed.barrier()
            if time_up:
                why = "stop requested" if stop.requested else f"max_train_seconds={cfg['max_train_seconds']} reached"
                print(f"{why} at step {step}; checkpoint saved (continue with --resume {run_dir})")
                total = step
                break
        epoch, pos = epoch + 1, 0
    pool.shutdown()
    bar.close()
    return best


# ---------------------------------------------------------------------------- main
def run(args) -> int:
    if args.list_keys:
        print(schema.describe_keys())
        return 0
    cfg, notes, source = resolve_config(args)
    print(f"config: {source} (precedence: schema defaults <- file <- --set <- --device)")
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
    resume_from = None
    if args.resume:
        run_dir = os.path.abspath(args.resume)
        resume_from = ckpt.latest_checkpoint(run_dir)
        if resume_from is None:
            raise UsageError(f"--resume {args.resume!r}: no epoch_*_step_* checkpoint with a training state in it")
    else:
        stamp = datetime.datetime.now().strftime("%Y_%m_%d__%H_%M_%S")
        tag = cfg["load_cp"] or cfg["model_type"]
        name = args.run_name or (f"eval_{cfg['mamba_arch']}_{os.path.basename(str(tag).rstrip('/'))}_{cfg['dataset']}_"
                                 f"{schema.config_hash(cfg)}" if cfg["eval_mode"] else
                                 f"{stamp}_{cfg['mamba_arch']}_{cfg['model_type']}_{cfg['dataset']}_seed_{cfg['seed']}{cfg['run_name_addon']}")
        run_dir = os.path.abspath(os.path.join(cfg["output_dir"], name))
    if world > 1:                               # every rank uses rank 0's run folder
        holder = [run_dir]
        torch.distributed.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "config.json"), cfg)
        print(f"run folder: {run_dir}")
    tok = load_tokenizer(cfg["tokenizer"], cfg["cache_dir"])
    task = get_task(cfg["dataset"])(cfg, tok, train=not cfg["eval_mode"])
    if cfg["record_debug_params"]:
        task.artifact_dir = os.path.join(run_dir, "artifacts")
    model, source = build_model(cfg, tok, device, weights=resume_from)
    logger = RunLogger(cfg, run_dir, os.path.basename(run_dir)) if rank == 0 else None
    try:
        if rank == 0 and cfg["find_deci_layer"] and not resume_from:
            find_deci_layer(task, model, cfg, run_dir, device)
            write_json_atomic(os.path.join(run_dir, "config.json"), cfg)
        if rank == 0 and not resume_from:
            score = run_eval(task, model, cfg, run_dir, device, source if cfg["eval_mode"] else "step_0", 0, "Initial Result")
            logger.log({"score": score}, 0)
        if world > 1:
            holder = [list(model.decimation.decimating_layers)]     # find_deci_layer's choice, everywhere
            torch.distributed.broadcast_object_list(holder, src=0)
            model.decimation.decimating_layers = holder[0]
        if not cfg["eval_mode"]:
            net = model
            if world > 1:
                net = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None)
            best = train(cfg, net, tok, task, run_dir, device, logger, resume_from, rank, world)
            if rank == 0:
                print(f"training done; best {task.primary_metric}: {best}")
    finally:
        if logger is not None:
            logger.finish()
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except schema.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (UsageError, OSError, ValueError, ImportError) as exc:
        if os.environ.get("DECIMAMBA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
