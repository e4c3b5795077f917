"""Optimizer and learning-rate schedule shared by training and pruning recovery."""

from __future__ import annotations


def make_optimizer(model, cfg, fused: bool = True):
    """AdamW with weight decay on matrices only (biases and norm gains are not decayed)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    unique = list({id(p): p for p in params}.values())
    groups = [
        {"params": [p for p in unique if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    try:
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def make_scheduler(optimizer, cfg):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type
    return get_scheduler(
        name, optimizer, num_warmup_steps=min(cfg.warmup_steps, cfg.max_steps), num_training_steps=cfg.max_steps
    )
