//! Image classifiers and the harness that measures whether synthetic images help: the models
//! (a small ResNet trained from scratch), the loss, data loading with augmentation, mixing real
//! and synthetic images, the protocols (few-shot splits, validation-selected epochs, group-shift evaluation) and the
//! training loop.
pub mod loss;
pub mod data;
pub mod groups;
pub mod mix;
pub mod protocol;
pub mod resnet;
pub mod stats;
pub mod train;
