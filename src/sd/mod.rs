//! Stable Diffusion 1.x: the models (tokenizer, CLIP text encoder, UNet, VAE) built from
//! [`crate::nn`] layers with diffusers' key names, and their file formats (configs, concept
//! embeddings, LoRA files, model folders).
pub mod clip;
pub mod concepts;
pub mod config;
pub mod inspect;
pub mod loader;
pub mod lora;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;

pub use loader::StableDiffusion;
