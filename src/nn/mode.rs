//! Per-layer execution choices: the mode (fused inference kernels or differentiable
//! compositions) and the product precision (f32 or bf16).
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::bf16::Kernel;

/// Which kernels to use: fused (inference) or differentiable (training, gradient checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Infer,
    Train,
}

/// Precision of the products in the fused CPU kernels of convolution, linear layers and
/// attention: f32, or inputs rounded to bf16 with f32 accumulation on one of the bf16 kernels
/// (AVX-512 BF16 or AMX tiles). Other ops, and every path that tracks gradients, stay f32. A
/// property of each layer, set when it is loaded ([`Weights::with_precision`]), so models of
/// different precision can live in one process.
///
/// [`Weights::with_precision`]: super::weights::Weights::with_precision
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16(Kernel),
}

impl Precision {
    /// bf16 products on the fastest kernel this CPU has (AMX where present).
    pub fn bf16() -> Self {
        Precision::Bf16(Kernel::best().unwrap_or(Kernel::Avx512))
    }

    /// The name used in settings, run records and cache keys: `f32`, `bf16` (AVX-512 BF16) or
    /// `bf16-amx` (the two bf16 kernels sum in different orders, so their bytes differ).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16(Kernel::Avx512) => "bf16",
            Precision::Bf16(Kernel::Amx) => "bf16-amx",
        }
    }

    /// An error when this CPU cannot run the precision, or when it is asked of a GPU (it
    /// selects the CPU's fused bf16 kernels, which never run on one).
    pub fn check(self, device: &Device) -> Result<()> {
        if self != Precision::F32 && !device.is_cpu() {
            return Err(Error::invalid(format!(
                "--precision {} selects the CPU's bf16 kernels and does nothing on a GPU: use --precision f32 with \
                 --dtype bf16 or f16 there (candle's CUDA products in that type)",
                self.name()
            )));
        }
        match self {
            Precision::Bf16(Kernel::Avx512) if !Kernel::Avx512.available() => Err(Error::invalid(
                "--precision bf16 needs a CPU with AVX-512 BF16 (e.g. AMD Zen 4, Intel Sapphire Rapids) or AMX; use f32",
            )),
            Precision::Bf16(Kernel::Amx) if !Kernel::Amx.available() => Err(Error::invalid(
                "--precision bf16-amx needs a CPU with AMX-BF16 tiles (Intel Sapphire Rapids or later) and a Linux kernel \
                 that grants them; use bf16 or f32",
            )),
            _ => Ok(()),
        }
    }
}

/// True when the fused f32 CPU kernels may replace candle's ops on these tensors: f32 on the
/// CPU, and no tensor tracks gradients (the kernels record no backward op).
pub fn fast_ok(ts: &[&Tensor]) -> bool {
    crate::kernels::fast_ok(ts)
}
