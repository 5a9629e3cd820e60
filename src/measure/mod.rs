//! Measuring instruments: [`parity`] compares our implementation tensor by tensor with a
//! diffusers reference run; [`bench`](mod@bench) times and sizes the models and the whole flow (with
//! PyTorch on the same shapes, through the reference scripts in `scripts/reference/`);
//! [`demo_world`] times the demo world's stages through the commands' own code.
pub mod bench;
pub mod demo_world;
pub mod parity;
