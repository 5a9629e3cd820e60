//! Synthetic images from a dataset: the methods and the driver they share.
//!
//! - [`pipeline`]: the generator (SD model + concepts + LoRA + scheduler) and its hashes;
//! - [`driver`]: output folder, resume, shards, records, manifest and previews for any
//!   [`driver::Method`];
//! - [`plan`]: which samples a run makes, their seeds and draws, and shards;
//! - [`manifest`]: the per-image records and the manifest file;
//! - [`guidance`]: classifier-free-guided noise prediction;
//! - [`invert`] with [`cache`]: DDIM inversion of dataset images, cached per image;
//! - [`interpolate`]: slerp and the official full-circle draw;
//! - [`diffii`]: the Diff-II method (two-stage sampling from interpolated inversions);
//! - [`img2img`]: the baselines DA-Fusion / Diff-AUG (image-to-image) and text-to-image.
pub mod cache;
pub mod diffii;
pub mod driver;
pub mod guidance;
pub mod img2img;
pub mod interpolate;
pub mod invert;
pub mod manifest;
pub mod pipeline;
pub mod plan;
