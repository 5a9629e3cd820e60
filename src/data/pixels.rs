//! Conversions between 8-bit RGB pixels and the [-1, 1] NCHW tensors the VAE works on, with
//! diffusers' conventions (`ToTensor` then `2x - 1` going in; `clamp(x/2 + 0.5, 0, 1) * 255`
//! coming out, rounded as `numpy_to_pil` does or truncated as the official Diff-II code does).
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// How a [0, 255] float becomes a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quantize {
    /// Round to nearest (diffusers' `numpy_to_pil`).
    #[default]
    Round,
    /// Truncate toward zero (the official Diff-II code's `.to(torch.uint8)`).
    Truncate,
}

/// HWC u8 pixels -> [1, 3, h, w] in [-1, 1] (f32 maths: x / 255, then 2x - 1).
pub fn u8_to_tensor(hwc: &[u8], h: usize, w: usize, device: &Device) -> Result<Tensor> {
    if hwc.len() != h * w * 3 {
        return Err(Error::invalid(format!("{} bytes for a {h}x{w} RGB image", hwc.len())));
    }
    let mut chw = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = hwc[(y * w + x) * 3 + c] as f32 / 255.0;
                chw[c * h * w + y * w + x] = 2.0 * v - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), device)?)
}

/// One decoded image [1, 3, h, w] (or [3, h, w]) in about [-1, 1] -> HWC u8.
pub fn tensor_to_u8(x: &Tensor, q: Quantize) -> Result<(Vec<u8>, usize, usize)> {
    let x = if x.rank() == 4 { x.squeeze(0)? } else { x.clone() };
    let (c, h, w) = x.dims3()?;
    if c != 3 {
        return Err(Error::invalid(format!("expected 3 channels, got {c}")));
    }
    let v: Vec<f32> = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = vec![0u8; h * w * 3];
    for ch in 0..3 {
        for i in 0..h * w {
            let s = (v[ch * h * w + i] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
            out[i * 3 + ch] = match q {
                Quantize::Round => s.round_ties_even() as u8,
                Quantize::Truncate => s as u8,
            };
        }
    }
    Ok((out, h, w))
}
