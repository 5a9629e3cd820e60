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
pub mod activation;
pub mod attention;
pub mod attention_grad;
pub mod batchnorm;
pub mod channel;
pub mod conv;
pub mod frozen;
pub(crate) mod items;
pub mod linear;
pub mod mode;
pub mod norm;
pub mod packed;
pub mod weights;

pub use activation::{geglu, Activation};
pub use attention::{attention, softmax_last_dim};
pub use batchnorm::BatchNorm2d;
pub use conv::{Conv2d, ConvInput};
pub use linear::{Adapter, Linear};
pub use mode::{fast_ok, Mode, Precision};
pub use norm::{GroupNorm, LayerNorm};
pub use weights::Weights;
