//! The Diff-II method on top of the SD components: inversion, interpolation, two-stage sampling.
pub mod cache;
pub mod generate;
pub mod interpolate;
pub mod invert;
pub mod manifest;
pub mod plan;
pub mod sample;
