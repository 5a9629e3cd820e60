//! Stable Diffusion 1.x components, loaded from a diffusers folder with diffusers' key names.
pub mod attention_grad;
pub mod bf16;
pub mod clip;
pub mod concepts;
pub mod config;
pub mod frozen;
pub mod loader;
pub mod lora;
pub mod inspect;
pub mod kernels;
pub mod nn;
pub mod tokenizer;
pub mod torch_pickle;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod weights;

pub use loader::StableDiffusion;
