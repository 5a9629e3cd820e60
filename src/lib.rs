//! diffii: Diff-II synthetic data augmentation for image classifiers on Stable Diffusion 1.x.
//!
//! Layout: [`sd`] holds the model components (tokenizer, CLIP text encoder, UNet, VAE) loaded
//! from a diffusers folder; [`schedule`] the DDIM sampler and inverter as plain functions;
//! [`diffii`] the method (inversion, interpolation, two-stage guided sampling); [`data`] image
//! conversions; [`parity`] the tensor-by-tensor comparison with a diffusers reference run.
pub mod bench;
pub mod data;
pub mod diffii;
pub mod error;
pub mod parity;
pub mod progress;
pub mod schedule;
pub mod sd;
pub mod train;
