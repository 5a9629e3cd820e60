//! Data in and out: pixel conversions between images and model tensors.
pub mod pixels;
