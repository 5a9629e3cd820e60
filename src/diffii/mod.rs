//! The Diff-II method on top of the SD components: inversion, interpolation, two-stage sampling.
pub mod interpolate;
pub mod invert;
pub mod sample;
