//! Data in and out: datasets (ImageFolder / list files), image decoding and resizing, pixel
//! conversions between images and model tensors, and atomic output files.
pub mod atomic;
pub mod dataset;
pub mod image;
pub mod pixels;
