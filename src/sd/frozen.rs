//! Products with a frozen operand whose backward skips that operand's gradient.
//!
//! candle's backward (0.11, `backprop.rs`) computes the gradient of *both* operands of every
//! matmul and convolution once the result is part of a graph that reaches a `Var`, frozen
//! weights included, and keeps every such leaf gradient in the returned `GradStore` until it is
//! dropped. `detach()` does not help: a weight is already a leaf without an op. For textual
//! inversion on SD-1.5 that is one full weight-sized gradient per layer (gigabytes) and a third
//! of the backward FLOPs, spent on numbers nobody reads.
//!
//! The custom ops here run the same forward kernel as candle's own op on the same layouts, so
//! results are bit-identical, and their backward returns `None` for the frozen operand: candle
//! then neither computes nor stores it. [`set_enabled`] switches them off (benchmarks measure
//! the difference; everything else leaves them on).
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Shape, Tensor};

use crate::error::Result;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the frozen-operand ops on or off process-wide (on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether `lhs.matmul(rhs)` should go through [`matmul_frozen_rhs`]: only the left operand
/// is part of a graph.
pub fn use_frozen_rhs(lhs: &Tensor, rhs: &Tensor) -> bool {
    enabled() && lhs.track_op() && !rhs.track_op()
}

/// `lhs.matmul(rhs)` (same shapes rules, same kernel, same bits) whose backward only produces
/// the gradient of `lhs`.
pub fn matmul_frozen_rhs(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    Ok(lhs.apply_op2(rhs, FrozenRhsMatmul)?)
}

struct FrozenRhsMatmul;

impl FrozenRhsMatmul {
    /// (batch, m, n, k) and the output shape, with the checks `Tensor::matmul` makes.
    fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Shape)> {
        let (a, b) = (l1.dims(), l2.dims());
        let r = a.len();
        if r < 2 || b.len() != r {
            candle_core::bail!("frozen matmul: ranks {a:?} and {b:?} do not match");
        }
        let (m, k, k2, n) = (a[r - 2], a[r - 1], b[r - 2], b[r - 1]);
        let batch: usize = a[..r - 2].iter().product();
        if k != k2 || batch != b[..r - 2].iter().product::<usize>() {
            candle_core::bail!("frozen matmul: shapes {a:?} and {b:?} do not multiply");
        }
        let mut out = a[..r - 2].to_vec();
        out.extend([m, n]);
        Ok(((batch, m, n, k), Shape::from(out)))
    }

    fn fwd<S: BackendStorage>(s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> candle_core::Result<(S, Shape)> {
        let (bmnk, shape) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }
}

impl CustomOp2 for FrozenRhsMatmul {
    fn name(&self) -> &'static str {
        "matmul-frozen-rhs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(&self, s1: &MetalStorage, l1: &Layout, s2: &MetalStorage, l2: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, _lhs: &Tensor, rhs: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(lhs rhs)/d lhs = grad rhs^T, as candle's own Matmul backward.
        Ok((Some(grad.matmul(&rhs.t()?)?), None))
    }
}
