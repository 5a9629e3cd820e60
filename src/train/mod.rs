//! Training: category concept learning (textual inversion per class, optionally with a LoRA on
//! the UNet's attention projections) — step 1 of Diff-II.
//!
//! Everything here runs the models in [`Mode::Train`](crate::nn::Mode), whose ops all have
//! a backward pass; the gradient tests in `tests/train.rs` and `tests/grad.rs` check them
//! against finite differences.
pub mod concepts;
pub mod optim;
