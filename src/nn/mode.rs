//! Per-layer execution choices: the mode (fused inference kernels or differentiable
//! compositions) and the product precision (f32 or bf16).
use candle_core::Tensor;

use crate::error::{Error, Result};

/// Which kernels to use: fused (inference) or differentiable (training, gradient checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Infer,
    Train,
}

/// Precision of the products in the fused CPU kernels of convolution and linear layers: f32,
/// or inputs rounded to bf16 with f32 accumulation (needs AVX-512 BF16). Other ops, and every
/// path that tracks gradients, stay f32. A property of each layer, set when it is loaded
/// ([`Weights::with_precision`]), so models of different precision can live in one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The name used in settings and run records: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// An error when this CPU cannot run the precision.
    pub fn check(self) -> Result<()> {
        if self == Precision::Bf16 && !crate::kernels::bf16::supported() {
            return Err(Error::invalid(
                "--precision bf16 needs a CPU with AVX-512 BF16 (e.g. AMD Zen 4, Intel Sapphire Rapids); use f32",
            ));
        }
        Ok(())
    }
}

/// True when the fused f32 CPU kernels may replace candle's ops on these tensors: f32 on the
/// CPU, and no tensor tracks gradients (the kernels record no backward op).
pub fn fast_ok(ts: &[&Tensor]) -> bool {
    crate::kernels::fast_ok(ts)
}
