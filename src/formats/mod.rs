//! Foreign file formats read without their home runtime.
pub mod torch_pickle;
