//! The kernels' access to tensors: contiguous f32 slices in, new tensors out, custom-op
//! plumbing, and the checks that decide when a fused kernel may replace candle's ops.
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};

use crate::error::{Error, Result};

/// True when the fast kernels may replace candle's ops: f32 on the CPU, and no tensor tracks
/// gradients (the kernels record no backward op).
pub fn fast_ok(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op())
}

/// Like [`fast_ok`] but ignores gradient tracking (for inference-mode call
/// sites, where candle's fused kernels already cut the graph).
pub fn fast_dtype_ok(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

fn slice_of<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => Err(Error::invalid("kernels: non-contiguous input")),
        },
        _ => Err(Error::invalid("kernels: expected an f32 CPU tensor")),
    }
}

/// An error unless the per-channel parameter `t` (a bias, a norm's scale or shift) holds
/// exactly `n` values: the kernels index it by channel and must not read past it or ignore
/// part of it.
pub(crate) fn check_per_channel(op: &str, what: &str, t: Option<&Tensor>, n: usize) -> Result<()> {
    match t {
        Some(t) if t.elem_count() != n => {
            Err(Error::invalid(format!("{op}: {what} {:?} does not hold one value per channel ({n})", t.dims())))
        }
        _ => Ok(()),
    }
}

/// Runs `f` on the contiguous f32 data of `ts` (made contiguous first if needed).
pub(crate) fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        slices.push(slice_of(s, l)?);
    }
    Ok(f(&slices))
}

/// f32 values whose first one starts a 64-byte cache line, as `Vec<f32>` cannot promise: a
/// kernel that loads a packed operand's rows as whole vectors then never loads one across two
/// lines (the direct convolution's channels-last tiles read 16 output channels of a weight row
/// per step, one line when aligned; measured, the misaligned weight cost them 10-25 %).
pub(crate) struct Lines {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
struct Line([f32; 16]);

impl Lines {
    /// `len` values that the caller overwrites completely (as [`uninit`]: zeroing a large
    /// packed weight first would be a second pass over it on every call).
    #[allow(clippy::uninit_vec)]
    pub(crate) fn uninit(len: usize) -> Lines {
        let mut lines = Vec::with_capacity(len.div_ceil(16));
        // SAFETY: a `Line` is 16 f32s, which have no invalid bit patterns; every caller writes
        // all `len` values before reading, and the tail past `len` is never read.
        unsafe { lines.set_len(len.div_ceil(16)) };
        Lines { lines, len }
    }
}

impl std::ops::Deref for Lines {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` initialised f32s, contiguous (a `Line` is 16
        // f32s with no padding), and lives as long as the borrow.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for `deref`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }
}

pub(crate) fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// A custom op's contiguous f32 input as a slice, without copying it.
pub(crate) fn op_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("{op}: expected contiguous f32 inputs")
    };
    Ok(&v[a..b])
}

/// The shape of a custom op's `N`-d input.
pub(crate) fn op_dims<const N: usize>(l: &Layout, op: &str) -> candle_core::Result<[usize; N]> {
    l.dims().try_into().map_err(|_| candle_core::Error::Msg(format!("{op}: expected a {N}-d input, got shape {:?}", l.dims())))
}

/// A kernel's values and shape as a custom op's `cpu_fwd` output (no copy).
pub(crate) fn op_result<const N: usize>(result: Result<(Vec<f32>, [usize; N])>, op: &str) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
    let (v, shape) = result.map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))?;
    Ok((CpuStorage::F32(v), candle_core::Shape::from(shape.to_vec())))
}

/// A custom op's gradient shaped like `like`, computed by `f` from the contiguous f32 data of
/// `inputs`; an error names the op.
pub(crate) fn op_grad(like: &Tensor, inputs: &[&Tensor], op: &str, f: impl FnOnce(&[&[f32]]) -> Vec<f32>) -> candle_core::Result<Tensor> {
    let g = with_slices(inputs, f).map_err(|e| candle_core::Error::Msg(format!("{op} backward: {e}")))?;
    Tensor::from_vec(g, like.shape(), like.device())
}

/// A `Vec<f32>` of length `n` whose contents the caller overwrites completely.
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns; every caller writes all n elements before reading.
    unsafe { v.set_len(n) };
    v
}

/// A raw pointer that may cross threads; tasks write disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
