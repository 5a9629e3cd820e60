//! diffii: Diff-II synthetic data augmentation for image classifiers on Stable Diffusion 1.x.
//!
//! Layout, from the bottom up (a module imports only from modules above it in this list):
//! - [`error`], [`progress`], [`instrument`] (profiler, FLOP counter, peak memory);
//! - [`kernels`]: CPU compute kernels by operation (linear, conv, attention, norm, activation,
//!   SIMD helpers, bf16 microkernel); know nothing of models;
//! - [`nn`]: layers and autograd pieces (Linear, Conv2d, norms, attention, frozen-weight ops,
//!   the checkpoint reader); any network (the SD models, a classifier) is built from these;
//! - [`formats`]: foreign file formats (PyTorch pickles, read without executing them);
//! - [`data`]: datasets, image decoding, pixel conversions, atomic output files;
//! - [`sd`]: the Stable Diffusion 1.x models and their file formats;
//! - [`schedule`]: the DDIM scheduler as plain functions, and the sampling and inversion loops
//!   that take the noise prediction as a closure;
//! - [`synth`]: synthetic images from a dataset: the generator pipeline, the driver every method
//!   runs under (resume, shards, records, manifest, previews) and the methods (Diff-II);
//! - [`train`]: concept learning (textual inversion, LoRA);
//! - [`bench`], [`parity`]: measuring instruments (speed, tensor-by-tensor comparison with a
//!   diffusers reference run).
pub mod bench;
pub mod data;
pub mod error;
pub mod formats;
pub mod instrument;
pub mod kernels;
pub mod nn;
pub mod parity;
pub mod progress;
pub mod schedule;
pub mod sd;
pub mod synth;
pub mod train;
