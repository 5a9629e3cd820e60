//! Seeded randomness that does not depend on threads, batches, shards or processing order.
//!
//! Every random draw in the crate comes from a generator whose seed is derived, by SHA-256,
//! from the run seed and the identity of what is drawn (a sample's class and index; a training
//! step's phase, step and micro-batch; a LoRA module's name). Two runs that make the same thing
//! therefore draw the same numbers however the work is split.
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;
use sha2::{Digest, Sha256};

use crate::error::Result;

/// SHA-256 of the concatenated `parts` (callers start with a tag naming the purpose, e.g.
/// `b"diffii-sample\0"`, and encode integers little-endian).
pub fn derive(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The first 8 bytes of [`derive`](fn@derive) as a little-endian u64.
pub fn derive_u64(parts: &[&[u8]]) -> u64 {
    u64::from_le_bytes(derive(parts)[..8].try_into().expect("8 bytes"))
}

/// A ChaCha8 generator seeded with the whole of [`derive`](fn@derive).
pub fn derive_rng(parts: &[&[u8]]) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(derive(parts))
}

/// A standard-normal tensor of `shape` (f32) drawn from ChaCha8 seeded with `seed`, in row-major
/// order, then moved to `device`. Deterministic across runs, platforms and thread counts (candle's
/// own CPU RNG cannot be seeded).
pub fn seeded_randn(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}
