"""The training loop: samples -> equal-length micro-batches -> one optimizer step, evaluation,
checkpoints, resume, and a clean stop on SIGTERM / SIGINT / max_train_seconds.

Tasks own their differences: a task whose samples are split into several forwards (PG-19 with
decimation) says how many in ``task.chunks``, and the loss divides by that number.

Stopping: the first signal stops after the current step and writes a checkpoint (a second signal
while it is written waits for it; a second signal at any other time stops at once). ``train``
then returns a TrainResult with ``stopped`` set; the command line exits with EXIT_STOPPED.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.evaluate import better, run_eval
from engine.optim import make_scheduler, param_groups

EXIT_STOPPED = 3          # exit status of a run stopped before its end with a checkpoint: continue with --resume


@dataclass
class StepBatch:
    """One rank's share of one optimizer step: (labels per row, chunks) micro-batches of equal length."""

    micro_batches: list
    n_kept: int
    lens: list
    loss_chunks: int = 1      # forwards per sample (the task's ``chunks``): the loss divides by it


@dataclass
class TrainResult:
    best: float | None
    step: int
    total: int
    stopped: str | None = None         # why the run stopped before ``total`` (None: it finished)
    checkpoint: str | None = None      # the checkpoint to resume from when stopped


def build_chunks(task, batch, epoch, cfg, rank=0, world=1) -> StepBatch:
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
    return StepBatch(mbs, n_kept, lens, task.chunks)


def _all_sum(values, device, world):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def train_step(model, built: StepBatch, cfg, device, autocast, world=1):
    """Accumulate the gradients of one optimizer step (equal-length chunks share a forward).

    The loss is the mean over the step's kept samples (dropped ones do not count, unlike the
    original, L12) of each sample's mean over its ``built.loss_chunks`` chunks; with DDP each rank
    scales by world size, as DDP averages gradients, and synchronises only on its last backward.
    ``cfg`` is unused (kept for callers of the old signature).
    """
    mbs = built.micro_batches
    kept_all, len_sum = _all_sum([built.n_kept, sum(built.lens)], device, world)
    if kept_all == 0:
        return None
    scale = world / (kept_all * built.loss_chunks)
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


class StopNow(KeyboardInterrupt):
    """A second stop signal outside a checkpoint write: stop at once, without a new checkpoint."""


class StopRequest:
    """SIGTERM / SIGINT ask the loop to stop after the current step and save a resumable
    checkpoint (preemption, a scheduler's time limit, Ctrl-C); a second signal stops at once,
    except while a checkpoint is being written (``shield``): that write is finished first."""

    def __init__(self):
        self.requested, self.signal_name, self._old, self._shielded = False, None, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and not self._shielded:
            raise StopNow(name)
        if self.requested:
            print(f"signal {name}: a checkpoint is being written; stopping right after it", flush=True)
            return
        self.requested, self.signal_name = True, name
        print(f"signal {name}: stopping after this step (a checkpoint is saved); again to stop at once", flush=True)

    @contextmanager
    def shield(self):
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg, model, tok, task, run_dir, device, logger, resume_from=None, rank=0, world=1,
          fresh_eval=False) -> TrainResult:
    """Train from step 0, recover_step, or ``resume_from`` (a checkpoint with a training state) to
    min(max_step, epochs x steps per epoch). fresh_eval: never reuse recorded eval cells."""
    with StopRequest() as stop:
        return _train(cfg, model, tok, task, run_dir, device, logger, resume_from, rank, world, stop, fresh_eval)


def _start(cfg, opt, sched_args, resume_from, per_epoch, main_rank):
    """(scheduler, step, epoch, pos, best) to start from: a checkpoint's state (--resume), the
    recover_step'th step (the step counter, LR schedule and data position continue there), or 0."""
    if resume_from:
        state = ckpt.load_training_state(resume_from)
        sched = make_scheduler(opt, *sched_args)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, epoch, pos, best = state["step"], state["epoch"], state["pos"], state["best"]
        if main_rank:
            print(f"resumed from {resume_from}: step {step}, epoch {epoch}, batch {pos}, best {best}")
        return sched, step, epoch, pos, best
    step = cfg["recover_step"] or 0
    if step and main_rank:
        print(f"recover_step={step}: the step counter, LR schedule, eval/save cadence and data position continue "
              f"at step {step} (optimizer moments and RNG start fresh; --resume restores them)")
    epoch, pos = divmod(step, per_epoch)
    return make_scheduler(opt, *sched_args, start_step=step), step, epoch, pos, None


def steps_per_epoch(cfg, task) -> int:
    return math.ceil(task.train_len() / cfg["grad_accum_steps"])


def nothing_left(cfg, task, step: int) -> str | None:
    """None if a run at ``step`` has steps left; else why not (max_step reached). Raises ValueError
    when max_step is not reached but the epochs are used up (the user asked for more than they allow)."""
    per_epoch = steps_per_epoch(cfg, task)
    by_epochs = per_epoch * cfg["epochs"]
    if step < min(cfg["max_step"], by_epochs):
        return None
    if cfg["max_step"] > step:
        raise ValueError(f"nothing to train: the run is at step {step}, and epochs={cfg['epochs']} x {per_epoch} "
                         f"steps per epoch = {by_epochs} steps are used up before max_step={cfg['max_step']}; "
                         f"add --set epochs={math.ceil(cfg['max_step'] / per_epoch)} to reach it")
    return f"nothing to train: the run is at step {step} and max_step={cfg['max_step']} (raise it with --set max_step=N)"


def _train(cfg, model, tok, task, run_dir, device, logger, resume_from, rank, world, stop, fresh_eval):
    """The optimisation loop; with world > 1, ``model`` is DDP-wrapped and only rank 0 evaluates,
    logs and saves."""
    raw = model.module if world > 1 else model
    main_rank = rank == 0
    bs = cfg["grad_accum_steps"]
    n = task.train_len()
    per_epoch = steps_per_epoch(cfg, task)
    total = min(cfg["max_step"], per_epoch * cfg["epochs"])
    opt = torch.optim.AdamW(param_groups(raw, cfg["weight_decay"], cfg["weight_decay_all_params"]), lr=cfg["lr"])
    sched, step, epoch, pos, best = _start(cfg, opt, (cfg["lr_sched_type"], cfg["warmup_steps"], total),
                                           resume_from, per_epoch, main_rank)
    if step >= total:
        why = nothing_left(cfg, task, step)
        if main_rank:
            print(why)
        return TrainResult(best, step, total)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not main_rank)
    t_start, why, last_ckpt = time.time(), None, resume_from
    pool = ThreadPoolExecutor(max_workers=1)           # builds the next step's samples meanwhile
    try:
        while step < total and epoch < cfg["epochs"] and why is None:
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
                                              f"Epoch {epoch} | Step In Epoch {bi} | Step {step}",
                                              fresh=fresh_eval)
                    if better(task, stats["score"], best):
                        best = stats["score"]
                        with stop.shield():
                            ckpt.save_checkpoint(os.path.join(run_dir, "best_model"), raw, tok, cfg)
                if main_rank:
                    logger.log(stats, step)
                if step % cfg["save_steps"] == 0 or step == total or time_up:
                    path = os.path.join(run_dir, f"epoch_{epoch}_step_{step}")
                    if main_rank:
                        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
                                 "step": step, "epoch": epoch, "pos": bi + 1, "best": best}
                        with stop.shield():
                            ckpt.save_checkpoint(path, raw, tok, cfg, state)
                    last_ckpt = path
                if world > 1 and (step % cfg["eval_steps"] == 0 or step % cfg["save_steps"] == 0 or time_up):
                    torch.distributed.barrier()
                if time_up and step < total:
                    why = (f"signal {stop.signal_name}" if stop.requested
                           else f"max_train_seconds={cfg['max_train_seconds']} reached")
                    break
            epoch, pos = epoch + 1, 0
    except StopNow as exc:
        why, last_ckpt = f"second signal {exc}: stopped at once", ckpt.latest_checkpoint(run_dir)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return TrainResult(best, step, total, why, last_ckpt if why else None)
