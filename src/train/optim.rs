//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019, Algorithm 2) with
//! state that can be saved and restored.
//!
//! candle-nn's `AdamW` computes the same update but keeps its moment estimates private, so a
//! run resumed from a checkpoint would restart them at zero and drift from an uninterrupted
//! run. This one exposes them, so `--resume` continues bit for bit.
//!
//! The update follows PyTorch's `torch.optim.AdamW` (what diffusers' training scripts use):
//! `θ ← θ (1 - lr λ)`, then `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
//! `θ ← θ - lr (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)`.
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::io::{fast_dtype_ok, tensor, with_slices};
use crate::kernels::optim::AdamWStep;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWParams {
    /// diffusers' training-script defaults (β 0.9 / 0.999, ε 1e-8, weight decay 1e-2).
    pub fn with_lr(lr: f64) -> Self {
        AdamWParams { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// One parameter group: variables sharing hyper-parameters, with their moment estimates.
pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates applied so far.
    pub t: usize,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let m = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW { params, vars, m, v, t: 0 })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Applies one update; `grads[i]` is the gradient of `vars[i]` (None: no gradient reached
    /// it, so only weight decay and the moments' decay apply, as in PyTorch with a zero grad).
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(format!("{} gradients for {} variables", grads.len(), self.vars.len())));
        }
        self.t += 1;
        let p = self.params;
        let fused = AdamWStep::new(p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, self.t);
        for (i, var) in self.vars.iter().enumerate() {
            let theta = var.as_tensor();
            let (m, v) = (&self.m[i], &self.v[i]);
            let g = grads[i].as_ref();
            let (theta, m, v) = if fast_dtype_ok(&[theta, m, v]) && g.is_none_or(|g| fast_dtype_ok(&[g]) && g.dims() == theta.dims()) {
                let shape = theta.dims();
                let ts: Vec<&Tensor> = [theta, m, v].into_iter().chain(g).collect();
                let (t1, m1, v1) = with_slices(&ts, |s| kernels::optim::adamw(&fused, s[0], s.get(3).copied(), s[1], s[2]))?;
                (tensor(t1, shape)?, tensor(m1, shape)?, tensor(v1, shape)?)
            } else {
                Self::step_ops(&p, self.t, theta, g, m, v)?
            };
            var.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// One variable's step as candle ops (any device and type): the new (θ, m, v). The fused
    /// kernel ([`kernels::optim::adamw`]) gives the same bits for f32 on the CPU.
    pub fn step_ops(p: &AdamWParams, t: usize, theta: &Tensor, g: Option<&Tensor>, m: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let bc1 = 1.0 - p.beta1.powi(t as i32);
        let bc2 = 1.0 - p.beta2.powi(t as i32);
        let g = match g {
            Some(g) => g.to_dtype(theta.dtype())?,
            None => theta.zeros_like()?,
        };
        let m = ((m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
        let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
        let decayed = (theta * (1.0 - p.lr * p.weight_decay))?;
        let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
        let upd = ((&m / bc1)? / denom)?;
        Ok(((decayed - (upd * p.lr)?)?, m, v))
    }

    /// The moment estimates, in variable order: (m, v).
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores moments and step count saved from an optimizer over the same variables.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, t: usize) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(Error::invalid("optimizer state does not match the trained variables"));
        }
        for ((var, a), b) in self.vars.iter().zip(&m).zip(&v) {
            if a.dims() != var.dims() || b.dims() != var.dims() {
                return Err(Error::invalid(format!(
                    "optimizer state of shape {:?} does not match a variable of shape {:?}",
                    a.dims(),
                    var.dims()
                )));
            }
        }
        self.m = m;
        self.v = v;
        self.t = t;
        Ok(())
    }
}
