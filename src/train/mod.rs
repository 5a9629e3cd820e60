//! Training: pretraining a small SD-1.x model from scratch ([`pretrain`]), category concept learning (textual inversion per class, optionally with a LoRA on
//! the UNet's attention projections) — step 1 of Diff-II — and the pieces any training run
//! shares: the diffusion loss, checkpoints, the loss log and the optimisers ([`optim`]: AdamW;
//! [`sgd`]: SGD with momentum, as the classifiers use), and the learning-rate schedule
//! ([`lr`]: linear warm-up then cosine decay).
//!
//! Everything here runs the models in [`Mode::Train`](crate::nn::Mode), whose ops all have
//! a backward pass; the gradient tests in `tests/train.rs` and `tests/grad.rs` check them
//! against finite differences (`tests/classifier_grad.rs` checks SGD and the schedule).
pub mod checkpoint;
pub mod concepts;
pub mod diffusion;
pub mod log;
pub mod lr;
pub mod optim;
pub mod pretrain;
pub mod sgd;
