//! Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay, exactly as
//! `torch.optim.SGD` (the optimiser of the classifier baselines), with momentum buffers that can
//! be saved and restored.
//!
//! Per parameter p with gradient g, each step (PyTorch's documented algorithm, `maximize = False`):
//! ```text
//! g ← g + weight_decay · p                       (when weight_decay ≠ 0)
//! if momentum ≠ 0:
//!     buf ← g                                    (first step: a copy, no dampening)
//!     buf ← momentum · buf + (1 - dampening) · g (later steps)
//!     g   ← g + momentum · buf  if nesterov  else  buf
//! p ← p - lr · g
//! ```
//! A parameter whose gradient is `None` is skipped entirely — no decay, and its buffer neither
//! created nor decayed — as PyTorch skips parameters whose `.grad` is `None`. Arithmetic runs
//! in the parameter's dtype with candle's (deterministic) CPU element-wise ops.
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Hyper-parameters of [`Sgd`], named as in `torch.optim.SGD`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl SgdParams {
    /// PyTorch's defaults: plain SGD (no momentum, dampening or weight decay).
    pub fn with_lr(lr: f64) -> Self {
        SgdParams { lr, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false }
    }

    /// The checks `torch.optim.SGD.__init__` makes, as typed errors.
    pub fn check(&self) -> Result<()> {
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_nonneg(self.lr) {
            return Err(Error::invalid(format!("invalid SGD learning rate {}", self.lr)));
        }
        if !finite_nonneg(self.momentum) {
            return Err(Error::invalid(format!("invalid SGD momentum {}", self.momentum)));
        }
        if !self.dampening.is_finite() {
            return Err(Error::invalid(format!("invalid SGD dampening {}", self.dampening)));
        }
        if !finite_nonneg(self.weight_decay) {
            return Err(Error::invalid(format!("invalid SGD weight decay {}", self.weight_decay)));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid("Nesterov momentum requires a momentum and zero dampening"));
        }
        Ok(())
    }
}

/// One parameter group: variables sharing hyper-parameters, with their momentum buffers.
pub struct Sgd {
    params: SgdParams,
    vars: Vec<Var>,
    /// `None` until the variable's first update with momentum (PyTorch's lazily made
    /// `momentum_buffer`).
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(vars: Vec<Var>, params: SgdParams) -> Result<Self> {
        params.check()?;
        let buffers = vec![None; vars.len()];
        Ok(Sgd { params, vars, buffers })
    }

    pub fn params(&self) -> SgdParams {
        self.params
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn lr(&self) -> f64 {
        self.params.lr
    }

    /// Sets the learning rate of the next steps (what a scheduler does between steps); an
    /// invalid one makes the next [`step`](Self::step) fail.
    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Applies one update; `grads[i]` is the gradient of `vars[i]`, `None` to leave it as is.
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(format!("{} gradients for {} variables", grads.len(), self.vars.len())));
        }
        self.params.check()?;
        // Checked before any update, so a bad gradient leaves every variable untouched.
        for (var, g) in self.vars.iter().zip(grads) {
            if let Some(g) = g {
                if g.dims() != var.dims() {
                    return Err(Error::invalid(format!(
                        "gradient of shape {:?} for a variable of shape {:?}",
                        g.dims(),
                        var.dims()
                    )));
                }
            }
        }
        let p = self.params;
        for ((var, grad), buf) in self.vars.iter().zip(grads).zip(self.buffers.iter_mut()) {
            let Some(grad) = grad else { continue };
            let theta = var.as_tensor();
            // Detached: neither the update nor a kept buffer may hold on to the backward graph.
            let mut g = grad.detach().to_dtype(theta.dtype())?;
            if p.weight_decay != 0.0 {
                g = (g + (theta.detach() * p.weight_decay)?)?;
            }
            if p.momentum != 0.0 {
                let b = match buf.take() {
                    None => g.copy()?,
                    Some(b) => ((b * p.momentum)? + (&g * (1.0 - p.dampening))?)?,
                };
                g = if p.nesterov { (g + (&b * p.momentum)?)? } else { b.clone() };
                *buf = Some(b);
            }
            var.set(&(theta.detach() - (g * p.lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers, in variable order (`None`: not made yet).
    pub fn buffers(&self) -> &[Option<Tensor>] {
        &self.buffers
    }

    /// Restores momentum buffers saved from an optimiser over the same variables.
    pub fn restore(&mut self, buffers: Vec<Option<Tensor>>) -> Result<()> {
        if buffers.len() != self.vars.len() {
            return Err(Error::invalid(format!(
                "{} momentum buffers for {} variables: the optimiser state does not match",
                buffers.len(),
                self.vars.len()
            )));
        }
        let mut out = Vec::with_capacity(buffers.len());
        for (var, b) in self.vars.iter().zip(buffers) {
            out.push(match b {
                Some(b) if b.dims() != var.dims() => {
                    return Err(Error::invalid(format!(
                        "momentum buffer of shape {:?} does not match a variable of shape {:?}",
                        b.dims(),
                        var.dims()
                    )))
                }
                Some(b) => Some(b.to_dtype(var.dtype())?.to_device(var.device())?.detach()),
                None => None,
            });
        }
        self.buffers = out;
        Ok(())
    }
}
