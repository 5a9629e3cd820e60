//! CPU compute kernels in f32 (and bf16 products with f32 accumulation), one module per
//! operation: [`linear`](mod@linear), [`conv`] (with Winograd's F(2x2, 3x3) for 3x3 convolutions of many channels on large maps, `winograd`, and, through unfolded inputs, small-channel convolutions and the gradients, [`conv_unfold`]), [`attention`](mod@attention)
//! (and its backward for training, [`attention_grad`]),
//! [`norm`], [`activation`], nearest upsampling for training ([`resize`]), the optimiser updates
//! ([`optim`]) and the timed FMA peak `bench` reports against ([`peak`]), on top of the
//! SIMD helpers ([`simd`], and [`expf`] / [`erff`] for e^x and erf with the bits of the
//! scalar functions candle calls), the f32 product ([`gemm`]) and the bf16 microkernel ([`bf16`]).
//!
//! The kernels work on contiguous f32 slices and return new tensors that record no backward
//! op: callers (the layers in [`crate::nn`]) use them only where no input tracks gradients, or
//! in inference mode where candle's fused ops already drop gradients. This module knows
//! nothing of models; it is shared by every network the crate runs.
//!
//! Determinism: every output element is computed by a sequence of operations that depends only
//! on the layer's shapes per batch element, never on the batch size or on the number of
//! threads. Matrix products go through the `gemm` crate once per batch element (per batch
//! element and head for attention), whose summation order depends only on the product's
//! (m, n, k) (the direct convolution kernel, `conv_taps`, repeats that order exactly where it
//! stands in for it; the Winograd convolutions, whose transforms round differently, are chosen by
//! the layer's shapes alone); reductions (norm statistics, softmax sums) run in a fixed order inside one task.
//! Frozen weights may be stored in the order the products read them (convolutions tap-major,
//! [`conv::tap_major`]; linear layers input-major, [`linear::in_major`]); gemm then sums each
//! output element in the same order, so the bytes do not depend on the storage either.
pub mod activation;
pub mod amx;
pub mod attention;
pub mod attention_grad;
pub mod bf16;
pub mod channel;
pub mod conv;
mod conv_taps;
pub mod conv_unfold;
pub mod erff;
pub mod expf;
pub mod gemm;
pub mod io;
pub mod linear;
pub mod norm;
pub mod optim;
pub mod peak;
pub mod resize;
pub mod simd;
mod winograd;

pub use activation::{geglu, silu};
pub use attention::{attention, softmax_last_dim};
pub use conv::{conv2d, ConvInput};
pub use io::{fast_dtype_ok, fast_ok};
pub use linear::{linear, pointwise_from_tokens, pointwise_to_tokens};
pub use norm::group_norm;
pub use simd::{erf_slice, exp_slice};

/// Helpers of the kernels' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// A deterministic tensor of `shape`: `amp` times the sine of a scrambled index.
    pub fn wave(seed: usize, shape: &[usize], amp: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (((i * 7 + seed * 131) as f32) * 0.618).sin() * amp).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Whether a test of the bf16 kernels must skip on this CPU (no AVX-512 BF16), saying so.
    pub fn without_bf16() -> bool {
        let skip = !super::bf16::supported();
        if skip {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
        }
        skip
    }

    /// The values of `x` in order.
    pub fn values(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The L2 distance of `a` from `b`, relative to `b`'s norm.
    pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
    }
}
