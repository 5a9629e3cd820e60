//! Learning-rate schedules as pure functions of the step, so a resumed run recomputes the rate
//! from its position alone (no scheduler state to save).
use std::f64::consts::PI;

/// Linear warm-up then half-cosine decay to `min_lr`: the rate for 0-based `step` of a run of
/// `total_steps` optimiser steps.
///
/// ```text
/// step < warmup:  lr = base_lr · (step + 1) / warmup
/// otherwise:      progress = (step - warmup) / (total - warmup)            ∈ [0, 1)
///                 lr = min_lr + (base_lr - min_lr) · ½ (1 + cos(π · progress))
/// step ≥ total:   lr = min_lr            (also when total = 0)
/// ```
///
/// This is HF transformers' `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`) with a floor
/// as in `get_cosine_with_min_lr_schedule_with_warmup`, and timm's `CosineLRScheduler` shape,
/// with one deliberate difference: the warm-up factor is `(step + 1) / warmup` rather than
/// `step / warmup`, so the first step already trains (at `base_lr / warmup`) and the last
/// warm-up step reaches `base_lr`. The decay then starts at `base_lr` on step `warmup` and
/// approaches `min_lr` at the end (it would reach it on step `total`, which is not taken).
/// `warmup = 0` means no warm-up; `warmup ≥ total` means the whole run is warm-up.
pub fn cosine_with_warmup(step: usize, total_steps: usize, warmup_steps: usize, base_lr: f64, min_lr: f64) -> f64 {
    if total_steps == 0 || step >= total_steps {
        return min_lr;
    }
    if step < warmup_steps {
        return base_lr * (step + 1) as f64 / warmup_steps as f64;
    }
    // step < total and step ≥ warmup, so total > warmup: no division by zero.
    let progress = (step - warmup_steps) as f64 / (total_steps - warmup_steps) as f64;
    min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (PI * progress).cos())
}
