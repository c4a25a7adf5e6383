"""Data-parallel training (torch DDP, gloo on CPU): one DDP step equals a single-process step."""
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import finetune_ssm
from configs import schema
from custom_datasets.niah import NiahTask
from custom_datasets.sources import load_tokenizer
from models import DecimatingMambaModel, MambaConfig
from tests.conftest import REPO
from tests.helpers import randomize

CFG = {"niah_noise_split_train": "validation", "niah_train_set_size": 8, "niah_context_len_train": 150,
       "grad_accum_steps": 6, "train_micro_batch_size": 2, "decimating_layers": [1], "decimation_max_p_L_base": 80}


def _setup():
    torch.manual_seed(0)                  # the same initial weights in every process
    cfg, _ = schema.load(None, dict(CFG))
    tok = load_tokenizer(cfg["tokenizer"])
    model = randomize(DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50277, ssm_cfg={"d_state": 4}),
                                           decimation_config=finetune_ssm.decimation_config(cfg)))
    return cfg, NiahTask(cfg, tok), model


def _grads(rank, world, path):
    cfg, task, model = _setup()
    net = model
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=world)
        net = torch.nn.parallel.DistributedDataParallel(model)
    batch = torch.arange(6)
    built = finetune_ssm.build_chunks(task, batch, 0, cfg, rank, world)
    stats = finetune_ssm.train_step(net, built, cfg, torch.device("cpu"), nullcontext(), world)
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "loss": stats["loss"]}, f"{path}.{world}")
    if world > 1:
        dist.destroy_process_group()


def test_ddp_step_gradients_equal_single_process(tmp_path):
    path = str(tmp_path / "g")
    _grads(0, 1, path)
    mp.spawn(_grads, args=(2, path), nprocs=2, join=True)
    single, ddp = torch.load(f"{path}.1"), torch.load(f"{path}.2")
    # the all-reduce sums the two ranks' gradients in another order: fp32 rounding only
    assert abs(single["loss"] - ddp["loss"]) < 1e-5
    for n, g in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_torchrun_cli_trains_and_saves_on_rank0(tmp_path):
    cfg = {**CFG, "activate_logging": False, "model_device": "cpu", "output_dir": str(tmp_path),
           "scratch_model_config": {"d_model": 16, "n_layer": 2, "ssm_cfg": {"d_state": 4}}, "max_step": 2,
           "eval_steps": 2, "save_steps": 2, "niah_needle_depths_eval": [0.5], "niah_context_lens_eval": [100]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "finetune_ssm.py"), "--config", str(p), "--run-name", "ddp"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "epoch_0_step_2" / "model.safetensors").exists()
    steps = [json.loads(x)["step"] for x in open(run / "train_log.jsonl")]
    assert steps == [0, 1, 2]                     # one logger (rank 0): no duplicate rows
