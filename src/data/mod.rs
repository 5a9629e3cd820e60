//! Data in and out: datasets (ImageFolder / list files), image decoding and resizing, pixel
//! conversions between images and model tensors, atomic output files, the output-folder lock,
//! and the real dataset shipped in the repository (`bundle`: a Fashion-MNIST subset,
//! materialised as ImageFolders, and `shift`: its coloured group-shift variant).
pub mod atomic;
pub mod bundle;
pub mod dataset;
pub mod image;
pub mod lock;
pub mod pixels;
pub mod shift;
