"""The training loop: one Trainer per process over accelerate (DDP, DeepSpeed ZeRO, LoRA, exact resume)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastserve_cli.core.batches import IGNORE_INDEX, BatchStream, eval_batches, load_splits
from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe
from fastserve_cli.core.rundir import RunDir, StageResult, fingerprint, staged_dir
from fastserve_cli.core.tracking import Trackers
from fastserve_cli.models.kernels import fuse_activations, head_bypassed, linear_cross_entropy, supports_fused_loss
from fastserve_cli.models.optim import make_optimizer, make_scheduler
from fastserve_cli.train import checkpoint as ckpt
from fastserve_cli.train.artifacts import last_metric, progress_bar, write_loss_plot, write_samples
from fastserve_cli.train.distributed import (
    all_reduce_sum,
    barrier,
    cuda_available,
    deepspeed_config,
    ensure_single_process_env,
    rank,
    world_size,
)
from fastserve_cli.train.resume import CheckpointMixin
from fastserve_cli.train.signals import StopFlag


@dataclass
class LoopState:
    """Everything besides tensors that a checkpoint must restore."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    early_stopped: bool = False


class Trainer(CheckpointMixin):
    """One training run of one recipe on one run directory (one instance per process)."""

    def __init__(self, recipe: Recipe, run: RunDir):
        self.recipe, self.run, self.cfg = recipe, run, recipe.train
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        self.state = LoopState()
        self.deepspeed = self.cfg.deepspeed is not None
        names = self.cfg.report_to if self.is_main else []
        self.trackers = Trackers(names, recipe.name, "train", run.root, recipe.model_dump(mode="json"))

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from accelerate.utils import set_seed
        from transformers import AutoTokenizer

        from fastserve_cli.models.modeling import apply_lora, build_model

        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        check_precision(self.cfg.mixed_precision)
        set_seed(self.recipe.seed)
        self.accelerator = self.make_accelerator()
        self.tokenizer = AutoTokenizer.from_pretrained(self.run.tokenizer_dir)
        self.train_data, self.val_data = load_splits(self.run.data_dir)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.stream = BatchStream(
            self.train_data, self.cfg.per_device_train_batch_size, self.recipe.seed, self.rank, self.world, pad_id
        )
        self.pad_id = pad_id
        model = build_model(self.recipe.model, self.tokenizer, self.recipe.data.block_size, self.recipe.seed)
        if self.cfg.lora:
            model = apply_lora(model, self.cfg.lora)
        self.raw_model = model
        self.fused_loss = self.use_fused_loss(model)
        if self.cfg.fused_kernels:
            fuse_activations(model)
        self.optimizer = make_optimizer(model, self.cfg, fused=not self.deepspeed)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.model, self.prepared_optimizer = self.accelerator.prepare(model, self.optimizer)
        if self.cfg.torch_compile:
            self.model = torch.compile(self.model)

    def use_fused_loss(self, model) -> bool:
        """The chunked loss bypasses the head inside the forward: only for plain models (fp32 weights, fp32 or
        bf16 compute) that the wrappers (peft, DeepSpeed's partitioning, torch.compile's graph guards) do not own."""
        cfg = self.cfg
        return (
            cfg.fused_kernels
            and not cfg.lora
            and not self.deepspeed
            and not cfg.torch_compile
            and cfg.mixed_precision in ("no", "bf16")
            and supports_fused_loss(model)
        )

    def forward_loss(self, batch: dict[str, Any]):
        """Summed next-token loss of one micro-batch."""
        import torch

        if self.fused_loss:
            with head_bypassed(self.raw_model) as head:
                hidden = self.model(**model_inputs(batch)).logits
            # accelerate's autocast covers the model's forward only: the head's matmuls get bf16 here.
            dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else None
            return linear_cross_entropy(hidden, head.weight, batch["labels"], dtype=dtype)
        logits = self.model(**model_inputs(batch)).logits
        return summed_token_loss(logits, batch["labels"])

    def make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        cfg = self.cfg
        if self.world == 1:
            # accelerate keeps its state in process-wide singletons; a second run in one process
            # (tests, notebooks) must not inherit the first one's device, precision or DeepSpeed setting.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        kwargs: dict[str, Any] = dict(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps
        )
        if self.deepspeed:
            if self.world == 1:
                ensure_single_process_env()
            # cpu=True would drop the plugin; DeepSpeed runs on CPU (gloo) by itself when there is no GPU.
            return Accelerator(
                deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=deepspeed_config(self.cfg, self.world)), **kwargs
            )
        return Accelerator(cpu=not cuda_available(), **kwargs)

    def resume_key(self) -> str:
        """Checkpoints resume only into the same model, data and batch geometry."""
        preprocess = (self.run.stage("preprocess") or {}).get("run_id")
        return fingerprint(
            {
                "model": self.recipe.model.model_dump(mode="json"),
                "seed": self.recipe.seed,
                "data": preprocess,
                "rows_per_step": self.stream.rows_per_step,
                "lora": self.cfg.lora.model_dump() if self.cfg.lora else None,
                "deepspeed": self.cfg.deepspeed.model_dump() if self.cfg.deepspeed else None,
            }
        )

    # -- main ------------------------------------------------------------------
    def fit(self) -> StageResult:

        self.setup()
        self.restore()
        try:
            return self._fit()
        finally:
            self.trackers.finish()

    def _fit(self) -> StageResult:
        from fastserve_cli.models.modeling import memory_error

        started, start_step = time.time(), self.state.step
        stop = StopFlag()
        with stop.installed(), self.progress() as advance:
            while self.state.step < self.cfg.max_steps and not self.state.early_stopped:
                try:
                    loss, grad_norm, tokens = self.train_step()
                except RuntimeError as err:
                    raise memory_error(err, f"training step {self.state.step + 1}") from None
                self.state.step += 1
                self.state.tokens_seen += tokens
                stopping = all_reduce_sum([1.0 if stop.signal else 0.0])[0] > 0
                self.after_step(loss, grad_norm, tokens)
                advance(self.state.step, loss)
                if self.state.early_stopped:
                    break
                if stopping:
                    self.save_checkpoint()
                    self.say(
                        f"training stopped by {stop.signal or 'a signal'} at step {self.state.step}; "
                        f"checkpoint saved, run `fastserve train` again to resume"
                    )
                    raise KeyboardInterrupt
        if self.state.step % self.cfg.eval_steps != 0 or not self.state.last_eval:
            self.evaluate()
        if (
            not ckpt.list_checkpoints(self.run.checkpoints_dir)
            or ckpt.list_checkpoints(self.run.checkpoints_dir)[-1][0] != self.state.step
        ):
            self.save_checkpoint()
        self.save_model()
        elapsed = time.time() - started
        return self.result(elapsed, self.state.step - start_step)

    def train_step(self) -> tuple[float, float | None, int]:
        """One optimizer step over gradient_accumulation_steps micro-batches; loss is the exact
        token-weighted mean over every process and micro-batch (so 1 and N processes agree)."""
        micro_batches = [self.stream.next() for _ in range(self.cfg.gradient_accumulation_steps)]
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        total_tokens = all_reduce_sum([float(local_tokens)])[0]
        # accelerate divides by the accumulation steps and DDP averages over processes: undo both.
        scale = self.world * self.cfg.gradient_accumulation_steps / max(total_tokens, 1.0)
        self.model.train()
        loss_sum, grad_norm = 0.0, None
        for batch in micro_batches:
            batch = to_device(batch, self.accelerator.device)
            with self.accelerator.accumulate(self.model):
                token_loss = self.forward_loss(batch)
                self.accelerator.backward(token_loss * scale)
                loss_sum += float(token_loss.detach())
                if self.accelerator.sync_gradients:
                    grad_norm = self.clip_gradients()
                self.prepared_optimizer.step()
                self.prepared_optimizer.zero_grad(set_to_none=True)
        self._lr_used = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        total_loss = all_reduce_sum([loss_sum])[0]
        return total_loss / max(total_tokens, 1.0), grad_norm, int(total_tokens)

    def clip_gradients(self) -> float | None:
        if self.deepspeed:
            return None  # DeepSpeed clips inside its step; the norm is read afterwards
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or float("inf"))
        return float(norm) if norm is not None else None

    def after_step(self, loss: float, grad_norm: float | None, tokens: int) -> None:
        step = self.state.step
        self._tokens_since_log = getattr(self, "_tokens_since_log", 0) + tokens
        if self.deepspeed:
            norm = self.model.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        if step % self.cfg.logging_steps == 0 or step == 1:
            self.log_train(loss, grad_norm)
        if step % self.cfg.eval_steps == 0:
            self.evaluate()
        if step % self.cfg.save_steps == 0 and step < self.cfg.max_steps:
            self.save_checkpoint()

    # -- metrics -----------------------------------------------------------------
    def log_train(self, loss: float, grad_norm: float | None) -> None:
        now = time.time()
        since = getattr(self, "_last_log", None)
        record: dict[str, Any] = {
            "step": self.state.step,
            "loss": loss,
            "lr": self.current_lr(),
            "grad_norm": grad_norm,
            "epoch": round(self.stream.position.epoch + self.stream.position.index / self.stream.batches_per_epoch, 4),
            "tokens": self.state.tokens_seen,
            "time": round(now, 4),
        }
        if since is not None:
            record["tokens_per_s"] = self._tokens_since_log / max(now - since, 1e-9)
        self._last_log, self._tokens_since_log = now, 0
        self.append_metrics(record)

    def current_lr(self) -> float:
        """The learning rate the step just taken used (the scheduler has already moved on)."""
        return float(getattr(self, "_lr_used", self.scheduler.get_last_lr()[0]))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, and the same numbers to the recipe's trackers (train.report_to)."""
        if not self.is_main:
            return
        with open(self.run.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.trackers.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"])

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss and perplexity; every process evaluates the same batches,
        which keeps DeepSpeed ZeRO-3 in lock-step and the number identical for any process count."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches(
                self.val_data, self.cfg.per_device_eval_batch_size, self.pad_id, self.cfg.eval_max_batches
            ):
                batch = to_device(batch, self.accelerator.device)
                with self.accelerator.autocast():
                    logits = self.model(**model_inputs(batch)).logits
                total += float(summed_token_loss(logits, batch["labels"]))
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = total / max(count, 1)
        result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        self.state.last_eval = result
        self.append_metrics({"step": self.state.step, **result})
        self.track_early_stopping(loss)
        return result

    def track_early_stopping(self, loss: float) -> None:
        best = self.state.best_eval_loss
        if best is None or loss < best:
            self.state.best_eval_loss, self.state.evals_without_improvement = loss, 0
            return
        self.state.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        if patience is not None and self.state.evals_without_improvement >= patience:
            self.state.early_stopped = True
            self.say(
                f"early stopping at step {self.state.step}: validation loss has not improved for {patience} evaluations"
            )

    def say(self, message: str) -> None:
        if self.is_main:
            from fastserve_cli.core.console import err_console

            err_console().print(message, highlight=False, soft_wrap=True)

    def progress(self):
        """A rich progress bar with live loss and throughput (main process only)."""
        return progress_bar(self.is_main, self.cfg.max_steps, self.state.step, lambda: self.state.tokens_seen)

    # -- final model -------------------------------------------------------------
    def save_model(self) -> None:
        """save_pretrained (safetensors) + tokenizer + generation config into model/, atomically."""
        from fastserve_cli.models.eos import generation_eos
        from fastserve_cli.models.modeling import merge_lora, special_token_ids

        state_dict = self.accelerator.get_state_dict(self.model) if self.deepspeed else None
        if self.is_main:
            model = merge_lora(self.raw_model if not self.deepspeed else self.accelerator.unwrap_model(self.model))
            if state_dict is not None and self.cfg.lora is None:
                model.load_state_dict(state_dict, strict=False)
            known_eos = model.generation_config.eos_token_id  # a pretrained model's own list is kept
            for key, value in special_token_ids(self.tokenizer).items():
                setattr(model.generation_config, key, value)
            # Every token that ends a reply (EOS + the chat template's end of turn), so generate() stops.
            model.generation_config.eos_token_id = generation_eos(self.tokenizer, known_eos)
            with staged_dir(self.run.model_dir) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            write_loss_plot(self.run.metrics_path, self.run.loss_plot_path)
            write_samples(
                model, self.tokenizer, self.cfg.sample_prompts, self.cfg.sample_new_tokens, self.run.samples_path
            )
        barrier()

    def result(self, elapsed: float, steps_run: int) -> StageResult:
        from fastserve_cli.models.modeling import parameter_counts

        metrics: dict[str, Any] = {"steps": self.state.step, "steps_this_run": steps_run}
        last_loss = last_metric(self.run.metrics_path, "loss") if self.is_main else None
        if last_loss is not None:
            metrics["train_loss"] = last_loss
        metrics.update(self.state.last_eval)
        metrics["tokens"] = self.state.tokens_seen
        metrics["train_seconds"] = round(elapsed, 3)
        if steps_run:
            tokens_this_run = (
                steps_run
                * self.stream.rows_per_step
                * self.cfg.gradient_accumulation_steps
                * self.recipe.data.block_size
            )
            metrics["tokens_per_s"] = round(tokens_this_run / max(elapsed, 1e-9), 1)
        metrics.update(parameter_counts(self.raw_model))
        metrics["processes"] = self.world
        if self.state.resumed_from is not None:
            metrics["resumed_from_step"] = self.state.resumed_from
        if self.state.early_stopped:
            metrics["early_stopped"] = True
        outputs = [
            self.run.rel(p)
            for p in (
                self.run.model_dir,
                self.run.checkpoints_dir,
                self.run.metrics_path,
                self.run.loss_plot_path,
                self.run.samples_path,
            )
            if p.exists()
        ]
        return StageResult(outputs=outputs, metrics=metrics)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Forward arguments of a training or evaluation batch. No KV cache: a cached forward copies every
    layer's keys and values into a cache it then throws away (~4% of a CPU step)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def check_precision(mixed_precision: str) -> None:
    """bf16 autocast on a CPU without bf16 dot products would be emulated (slower than fp32): a user error,
    as for serve.dtype."""
    from fastserve_cli.models.precision import cpu_supports_bf16

    if mixed_precision == "bf16" and not cuda_available() and not cpu_supports_bf16():
        raise UserError(
            "train.mixed_precision bf16: this CPU lacks avx512_bf16/AMX (bf16 would be emulated, slower "
            "than fp32); set it to no"
        )


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """Move a batch; an all-ones attention mask (packed data) becomes None, which lets SDPA take its
    causal kernel directly and keeps torch.compile free of the data-dependent "is it padded?" check."""
    mask = batch["attention_mask"]
    return {
        "input_ids": batch["input_ids"].to(device),
        "labels": batch["labels"].to(device),
        "attention_mask": None if bool(mask.all()) else mask.to(device),
    }


def summed_token_loss(logits, labels):
    """Next-token cross-entropy summed over labelled tokens. The labels are shifted rather than the
    logits sliced, which would copy the largest activation of the step (batch x seq x vocab)."""
    import torch.nn.functional as F

    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
