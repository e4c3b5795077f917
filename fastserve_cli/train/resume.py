"""Full training state in checkpoints/step-N and exact resume from it (a mixin of the Trainer in loop.py).

A checkpoint holds model, optimizer, scheduler, RNG of every rank and the data position; it is staged and
renamed by the main process, so a crash never leaves a half-written one, and resume continues the exact
same batch order (see core/batches.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastserve_cli.core.batches import DataPosition
from fastserve_cli.core.rundir import staged_dir
from fastserve_cli.train import checkpoint as ckpt
from fastserve_cli.train.artifacts import truncate_metrics
from fastserve_cli.train.distributed import barrier, broadcast_object, cuda_available, gather_objects


class CheckpointMixin:
    """save_checkpoint / restore for the Trainer (uses its state, models, optimizer, scheduler and stream)."""

    def save_checkpoint(self) -> None:
        """Full state into checkpoints/step-N, atomically (staged dir renamed by the main process)."""
        import torch

        rng = {f"cpu_rank{self.rank}": torch.get_rng_state()}
        if cuda_available():
            rng[f"cuda_rank{self.rank}"] = torch.cuda.get_rng_state()
        rng_states = {k: v for part in gather_objects(rng) for k, v in part.items()}
        final = ckpt.step_dir(self.run.checkpoints_dir, self.state.step)
        if self.is_main:
            with staged_dir(final) as tmp:
                broadcast_object(str(tmp))
                self.write_checkpoint(tmp, rng_states)
        else:
            self.write_checkpoint(Path(broadcast_object(None)), rng_states)
        barrier()
        if self.is_main:
            ckpt.prune(self.run.checkpoints_dir, self.cfg.save_total_limit)

    def write_checkpoint(self, tmp: Path, rng_states: dict[str, Any]) -> None:
        if self.deepspeed:
            self.model.save_checkpoint(str(tmp / "deepspeed"), tag="ds")
            barrier()
        if not self.is_main:
            return
        if self.deepspeed:
            (tmp / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()), encoding="utf-8")
        else:
            ckpt.write_model_state(tmp, self.raw_model, self.optimizer, self.scheduler)
        ckpt.write_rng(tmp, rng_states)
        state = {
            "step": self.state.step,
            "position": self.stream.position.to_dict(),
            "tokens_seen": self.state.tokens_seen,
            "best_eval_loss": self.state.best_eval_loss,
            "evals_without_improvement": self.state.evals_without_improvement,
            "last_eval": self.state.last_eval,
            "early_stopped": self.state.early_stopped,
            "world_size": self.world,
            "resume_key": self.resume_key(),
        }
        ckpt.seal(tmp, state)

    def restore(self) -> None:
        """Continue from the newest good checkpoint, or start fresh (clearing stale metrics)."""
        found = ckpt.newest_valid(self.run.checkpoints_dir, self.say)
        if found is not None and found[1].get("resume_key") != self.resume_key():
            self.say(
                f"checkpoints in {self.run.checkpoints_dir} are from a different model, data or batch size; starting fresh"
            )
            if self.is_main:
                shutil.rmtree(self.run.checkpoints_dir, ignore_errors=True)
            found = None
        barrier()
        if found is None:
            if self.is_main:
                self.run.metrics_path.unlink(missing_ok=True)
            return
        path, saved = found
        self.load_checkpoint(path, saved)
        self.state.resumed_from = saved["step"]
        if self.is_main:
            truncate_metrics(self.run.metrics_path, saved["step"])
        self.say(f"resuming from {path} (step {saved['step']})")

    def load_checkpoint(self, path: Path, saved: dict[str, Any]) -> None:
        import torch

        if self.deepspeed:
            self.model.load_checkpoint(str(path / "deepspeed"), tag="ds")
            self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text(encoding="utf-8")))
        else:
            ckpt.load_model_state(path, self.raw_model, self.optimizer, self.scheduler)
        rng = ckpt.read_rng(path)
        if f"cpu_rank{self.rank}" in rng:
            torch.set_rng_state(rng[f"cpu_rank{self.rank}"])
        if cuda_available() and f"cuda_rank{self.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda_rank{self.rank}"])
        self.realign_learning_rate()
        self.state.step = saved["step"]
        self.stream.position = DataPosition(**saved["position"])
        self.state.tokens_seen = saved.get("tokens_seen", 0)
        self.state.best_eval_loss = saved.get("best_eval_loss")
        self.state.evals_without_improvement = saved.get("evals_without_improvement", 0)
        self.state.last_eval = saved.get("last_eval") or {}
        self.state.early_stopped = bool(saved.get("early_stopped"))

    def realign_learning_rate(self) -> None:
        """Set the optimizer's lr from the schedule at the restored step. The optimizer state holds
        the lr of the old schedule, which is wrong when train.max_steps changed between runs."""
        sched = self.scheduler
        lrs = [base * factor(sched.last_epoch) for factor, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
