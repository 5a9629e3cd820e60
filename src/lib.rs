//! diffii: Diff-II synthetic data augmentation for image classifiers on Stable Diffusion 1.x.
//!
//! Layout, from the bottom up (a module imports only from modules above it in this list):
//! - [`error`], [`progress`], [`instrument`] (profiler, FLOP counter, peak memory), [`hash`]
//!   (SHA-256 of bytes, files and settings), [`rng`] (seed derivation and seeded noise);
//! - [`kernels`]: CPU compute kernels by operation (linear, conv, attention, norm, activation,
//!   SIMD helpers, bf16 microkernel); know nothing of models;
//! - [`data`]: datasets, image decoding, pixel conversions, atomic output files, the shipped
//!   Fashion-MNIST subset;
//! - [`nn`]: layers and autograd pieces (Linear, Conv2d, norms, attention, frozen-weight ops,
//!   the checkpoint reader); any network (the SD models, a classifier) is built from these;
//! - [`formats`]: foreign file formats (PyTorch pickles, read without executing them);
//! - [`schedule`]: the DDIM scheduler as plain functions, and the sampling and inversion loops
//!   that take the noise prediction as a closure;
//! - [`sd`]: the Stable Diffusion 1.x models and their file formats;
//! - [`synth`]: synthetic images from a dataset: the generator pipeline, the driver every method
//!   runs under (resume, shards, records, manifest, previews) and the methods (Diff-II);
//! - [`train`]: pretraining a small SD-1.x model from scratch, concept learning (textual
//!   inversion, LoRA) and what every training run shares (diffusion loss, checkpoints, loss
//!   log, optimisers);
//! - [`classify`]: image classifiers and the harness that measures whether synthetic images
//!   help (ResNet, protocols, mixing real and synthetic images, validation-selected results);
//! - [`experiment`]: experiments across methods (`compare`: methods x seeds under one
//!   protocol, with a results table; `report`: the HTML page; `demo`: the whole method on the
//!   shipped data and model);
//! - [`measure`]: the measuring instruments (`bench`: speed and memory; `parity`:
//!   tensor-by-tensor comparison with a diffusers reference run).
//!
//! `tests/layout.rs` checks on the source that the module graph has no cycles and that the low
//! layers do not import the ones above them.
pub mod classify;
pub mod data;
pub mod error;
pub mod experiment;
pub mod formats;
pub mod hash;
pub mod instrument;
pub mod kernels;
pub mod measure;
pub mod nn;
pub mod progress;
pub mod rng;
pub mod schedule;
pub mod sd;
pub mod synth;
pub mod train;
