//! Layers and the autograd pieces they need, independent of any particular model: linear and
//! convolution layers (with fused epilogues, LoRA adapters, bf16 products), norms, activations,
//! attention, the checkpoint reader ([`weights`]), and custom ops whose backward passes candle
//! lacks or computes wastefully ([`attention_grad`], [`frozen`]).
//!
//! Every layer has two execution modes. candle's fused `layer_norm` and `softmax_last_dim` are
//! fast but have no backward pass: a gradient through them silently vanishes. [`Mode::Train`]
//! switches those two to compositions of differentiable primitives (same maths, slower);
//! [`Mode::Infer`] uses the fused kernels. GroupNorm, convolution, linear layers and
//! activations are differentiable in both modes.
//!
//! Every product layer adds its multiply-accumulate count to [`crate::instrument::flops`] and
//! its time to [`crate::instrument::profile`], so benchmarks report what actually ran.
use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId};

use crate::error::{Error, Result};

pub mod activation;
pub mod attention;
pub mod attention_grad;
pub mod conv;
pub mod frozen;
pub mod linear;
pub mod norm;
pub mod weights;

pub use activation::{geglu, Activation};
pub use attention::{attention, softmax_last_dim};
pub use conv::{Conv2d, ConvInput};
pub use linear::{Adapter, Linear};
pub use norm::{GroupNorm, LayerNorm};
pub use weights::Weights;

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

/// A layer's weight in the form the bf16 kernels read: made on first use, remade when the
/// weight tensor is replaced (a merged LoRA), shared by clones of the layer and freed with the
/// last of them.
pub(crate) struct PackedWeight<T>(Arc<Mutex<Option<(TensorId, Arc<T>)>>>);

impl<T> PackedWeight<T> {
    pub(crate) fn get(&self, weight: &Tensor, make: impl FnOnce(&Tensor) -> Result<T>) -> Result<Arc<T>> {
        let mut slot = self.0.lock().map_err(|_| Error::invalid("packed weight: a packing thread panicked"))?;
        if let Some((id, p)) = slot.as_ref() {
            if *id == weight.id() {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(make(weight)?);
        *slot = Some((weight.id(), p.clone()));
        Ok(p)
    }
}

impl<T> Clone for PackedWeight<T> {
    fn clone(&self) -> Self {
        PackedWeight(self.0.clone())
    }
}

impl<T> Default for PackedWeight<T> {
    fn default() -> Self {
        PackedWeight(Arc::new(Mutex::new(None)))
    }
}

impl<T> std::fmt::Debug for PackedWeight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self.0.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(f, "PackedWeight {{ packed: {packed} }}")
    }
}
