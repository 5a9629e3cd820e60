//! The classifier's training objective and its simplest measure: label-smoothed cross-entropy
//! against class-probability targets, one-hot targets, and top-1 accuracy.
//!
//! Targets are probabilities rather than class indices so that one loss serves hard labels
//! (one-hot rows), mixed labels (mixup / cutmix) and any other soft labels alike.
use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// Mean over the batch of `-Σ_k t'_k · log_softmax(logits)_k`, with the smoothed targets
/// `t' = (1 - ε) t + ε / K` — PyTorch's `F.cross_entropy(logits, target_probs,
/// label_smoothing=ε)` with probability targets and `reduction='mean'` (which divides by the
/// batch size). With one-hot targets this equals the index-target form of the same call.
///
/// `logits` and `targets` are `[b, K]`; targets are taken as given (rows need not sum to 1, as in
/// PyTorch). The log-softmax is `z - log Σ exp z` with `z = logits - max` (the max detached: it
/// only keeps `exp` in range, and the result does not depend on it), built from ops that all
/// have a backward pass, so gradients reach the logits. Half-precision logits are computed in
/// f32, and the loss (a scalar) is then f32; otherwise it has the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let (b, k) = match logits.dims() {
        [b, k] => (*b, *k),
        d => return Err(Error::invalid(format!("cross-entropy expects logits [batch, classes], got shape {d:?}"))),
    };
    if targets.dims() != logits.dims() {
        return Err(Error::invalid(format!(
            "cross-entropy targets of shape {:?} for logits of shape {:?}",
            targets.dims(),
            logits.dims()
        )));
    }
    if b == 0 || k == 0 {
        return Err(Error::invalid(format!("cross-entropy of an empty batch (logits shape {:?})", logits.dims())));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::invalid(format!("label smoothing must lie in [0, 1], got {label_smoothing}")));
    }
    let dtype = match logits.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        DType::F32 => DType::F32,
        DType::F64 => DType::F64,
        other => return Err(Error::invalid(format!("cross-entropy needs floating-point logits, got {other:?}"))),
    };
    let logits = logits.to_dtype(dtype)?;
    let targets = targets.to_dtype(dtype)?;
    let log_p = log_softmax(&logits)?;
    let t = if label_smoothing == 0.0 {
        targets
    } else {
        ((targets * (1.0 - label_smoothing))? + label_smoothing / k as f64)?
    };
    Ok((t.mul(&log_p)?.sum_all()? * (-1.0 / b as f64))?)
}

/// Log-softmax over the last dim of a `[b, K]` tensor, composed of differentiable ops.
fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let z = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// One-hot rows `[labels.len(), k]` (f32) on `device`: row i has a 1 at `labels[i]`.
pub fn one_hot(labels: &[usize], k: usize, device: &Device) -> Result<Tensor> {
    soft_targets(&labels.iter().map(|&l| vec![(l, 1.0)]).collect::<Vec<_>>(), k, device)
}

/// Probability rows `[rows.len(), k]` (f32) on `device`: row i has weight w at class c for
/// every (c, w) of `rows[i]` (a one-hot row is `[(label, 1.0)]`).
pub fn soft_targets(rows: &[Vec<(usize, f64)>], k: usize, device: &Device) -> Result<Tensor> {
    if k == 0 {
        return Err(Error::invalid("targets need at least one class"));
    }
    let mut data = vec![0f32; rows.len() * k];
    for (i, row) in rows.iter().enumerate() {
        for &(c, w) in row {
            if c >= k {
                return Err(Error::invalid(format!("label {c} (item {i}) is out of range for {k} classes")));
            }
            data[i * k + c] += w as f32;
        }
    }
    Ok(Tensor::from_vec(data, (rows.len(), k), device)?)
}

/// The number of rows of `logits` `[b, K]` whose arg-max is the label (see [`correct_flags`]).
pub fn accuracy(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    Ok(correct_flags(logits, labels)?.into_iter().filter(|&ok| ok).count())
}

/// Per row of `logits` `[b, K]`, whether its arg-max is the label. A tie goes to the lowest
/// class index (`torch.argmax` does not specify its tie-break; this makes counts reproducible).
/// NaN logits are an error rather than a silent miss: they mean training has diverged.
pub fn correct_flags(logits: &Tensor, labels: &[usize]) -> Result<Vec<bool>> {
    let (b, k) = match logits.dims() {
        [b, k] => (*b, *k),
        d => return Err(Error::invalid(format!("accuracy expects logits [batch, classes], got shape {d:?}"))),
    };
    if b != labels.len() {
        return Err(Error::invalid(format!("{} labels for a batch of {b} logits", labels.len())));
    }
    if k == 0 && b > 0 {
        return Err(Error::invalid("accuracy of logits over zero classes"));
    }
    let rows: Vec<Vec<f64>> = logits.detach().to_dtype(DType::F64)?.to_vec2()?;
    let mut correct = Vec::with_capacity(b);
    for (i, (row, &label)) in rows.iter().zip(labels).enumerate() {
        if label >= k {
            return Err(Error::invalid(format!("label {label} (item {i}) is out of range for {k} classes")));
        }
        if row.iter().any(|v| v.is_nan()) {
            return Err(Error::invalid(format!("logits of item {i} contain NaN")));
        }
        let mut best = 0;
        for (j, &v) in row.iter().enumerate().skip(1) {
            // Strictly greater: an equal later value does not displace an earlier maximum.
            if v > row[best] {
                best = j;
            }
        }
        correct.push(best == label);
    }
    Ok(correct)
}
