"""Training scalars to <run>/train_log.jsonl always, and to wandb only when activate_logging.

wandb is imported lazily; with no API key it runs offline (never a login prompt), and a missing
package or a failing init only warns: logging must never block or kill a run.
"""
from __future__ import annotations

import json
import os
import warnings


class RunLogger:
    def __init__(self, cfg: dict, run_dir: str, run_name: str):
        self.path = os.path.join(run_dir, "train_log.jsonl")
        self.wandb = None
        if cfg["activate_logging"]:
            mode = cfg["wandb_mode"] or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            try:
                import wandb

                os.environ.setdefault("WANDB_CACHE_DIR", cfg["wandb_dir"])
                os.makedirs(cfg["wandb_dir"], exist_ok=True)
                self.wandb = wandb.init(project=cfg["wandb_project"], config=cfg, dir=cfg["wandb_dir"], name=run_name,
                                        mode=mode, settings=wandb.Settings(init_timeout=30))
            except ImportError:
                warnings.warn("activate_logging is true but wandb is not installed (pip install wandb); "
                              f"logging to {self.path} only", stacklevel=2)
            except Exception as exc:  # noqa: BLE001 - any wandb failure must not stop training
                warnings.warn(f"wandb init failed ({exc}); logging to {self.path} only", stacklevel=2)

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
