//! Linear layers: y = x W^T + b (+ residual), one gemm per batch element, and the pointwise
//! (1x1) products that read or write NCHW maps as token rows.
use candle_core::Tensor;
use rayon::prelude::*;

use super::bf16::{self, PairPlanes};
use super::conv_taps;
use super::gemm::{per_item, sgemm, threads};
use super::io::{check_per_channel, tensor, uninit, with_slices, Lines};
use crate::error::{Error, Result};

/// `x` [items, rows, in] (rank >= 3: items = dim 0) or [rows, in] (rank 2: every row is its
/// own item) times `weight` [out, in]^T, plus `bias` \[out\] and `residual` (shaped like the
/// output). With `packed` (the weight from [`pack_weight`]) the products take bf16 inputs with
/// f32 accumulation; a weight stored [`in_major`] is read in place. Inference only (no
/// backward).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, packed: Option<&PackedLinear>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().ok_or_else(|| Error::invalid("linear: scalar input"))?;
    let (out_dim, w_in) = weight.dims2()?;
    if w_in != in_dim {
        return Err(Error::invalid(format!("linear: input dim {in_dim} vs weight {:?}", weight.dims())));
    }
    let out_shape = checked_out_shape("linear", &dims, out_dim, bias, residual)?;
    let (rows, items) = row_blocks(&dims);
    let total_rows = rows * items;
    // The bf16 product reads only the packed weight; the f32 one may be an input-major view,
    // which `with_slices` would copy whole on every call, so it is left out (`x` holds its slot).
    let mut ts: Vec<&Tensor> = vec![x, if packed.is_some() { x } else { weight }];
    if let Some(b) = bias {
        ts.push(b);
    }
    if let Some(r) = residual {
        ts.push(r);
    }
    if let Some(pw) = packed {
        if (pw.planes.k_pairs, pw.planes.plane) != (in_dim.div_ceil(2), out_dim) {
            return Err(Error::invalid(format!("linear: packed weight does not match {:?}", weight.dims())));
        }
    }
    let wt = weight.t()?;
    let in_major = packed.is_none() && reads_in_major(rows, in_dim, out_dim) && is_in_major(weight);
    if in_major {
        ts[1] = &wt;
    }
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let bs = bias.map(|_| s[2]);
        let rs = residual.map(|_| s[s.len() - 1]);
        let mut out = uninit(total_rows * out_dim);
        if total_rows == 0 || out_dim == 0 {
            return out;
        }
        let nt = threads();
        if rowwise(&dims) {
            // Single rows (e.g. the time embedding): rows are independent tasks.
            out.par_chunks_mut(out_dim).enumerate().for_each(|(i, dst)| {
                let start = bf16::Start::Fill { bias: bs.map(bf16::Bias::Columns), residual: rs.map(|r| &r[i * out_dim..(i + 1) * out_dim]) };
                let acc = start.preload(dst, out_dim, false);
                unsafe {
                    sgemm(1, out_dim, in_dim, dst.as_mut_ptr(), out_dim, 1, acc, xs[i * in_dim..].as_ptr(), in_dim, 1, ws.as_ptr(), 1, in_dim, 1.0, 1)
                };
            });
            return out;
        }
        // On AMX tiles all items run as one product over all their rows: several items' rows
        // share 32-row tile blocks (the text encoder's two 77-token prompts fill 5 blocks, not
        // 2 x 3) and the threads split the weight's columns instead of each reading all of it.
        // Every output element is still one chain over k in the same order, so each item keeps
        // the bits it has alone.
        if let Some(pw) = packed.filter(|pw| pw.kernel == bf16::Kernel::Amx) {
            let a = bf16::PackedA::from_rows(pw.kernel, total_rows, in_dim, xs, in_dim);
            let start = bf16::Start::Fill { bias: bs.map(bf16::Bias::Columns), residual: rs };
            bf16::gemm_taps(&a, &pw.planes, &[0], out_dim, &mut out, out_dim, start, nt > 1).expect("shapes checked above");
            return out;
        }
        // Several items: one item per task, each product on one thread; a single item splits
        // its product across the threads instead. Either way an item's arithmetic is the same.
        let nt = if items > 1 { 1 } else { nt };
        let one = |i: usize, dst: &mut [f32]| {
            let res = rs.map(|r| &r[i * rows * out_dim..(i + 1) * rows * out_dim]);
            let start = bf16::Start::Fill { bias: bs.map(bf16::Bias::Columns), residual: res };
            if let Some(pw) = packed {
                // AVX-512 (AMX took the branch above).
                let xi = &xs[i * rows * in_dim..(i + 1) * rows * in_dim];
                let a = bf16::PackedA::row_major(rows, in_dim, xi, in_dim, Vec::new(), nt > 1);
                bf16::gemm_taps(&a, &pw.planes, &[0], out_dim, dst, out_dim, start, nt > 1).expect("shapes checked above");
                return;
            }
            let acc = start.preload(dst, out_dim, nt > 1);
            // The weight's strides as the [in, out] right-hand side.
            let (w_rs, w_cs) = if in_major { (out_dim, 1) } else { (1, in_dim) };
            unsafe {
                sgemm(
                    rows,
                    out_dim,
                    in_dim,
                    dst.as_mut_ptr(),
                    out_dim,
                    1,
                    acc,
                    xs[i * rows * in_dim..].as_ptr(),
                    in_dim,
                    1,
                    ws.as_ptr(),
                    w_rs,
                    w_cs,
                    1.0,
                    nt,
                )
            };
        };
        per_item(&mut out, items, one);
        out
    })?;
    tensor(out, &out_shape)
}

/// A frozen f32 weight [out, in] packed once for [`linear_panels`]: panels of one register
/// tile's width of output channels, each [in, width], from the start of a cache line.
pub struct Panels {
    lines: Lines,
    in_dim: usize,
    out_dim: usize,
}

/// `weight` [out, in], stored either way, packed for [`linear_panels`] (done once per layer).
pub fn pack_panels(weight: &Tensor) -> Result<Panels> {
    let (out_dim, in_dim) = weight.dims2()?;
    if !conv_taps::available() {
        return Err(Error::invalid("linear panels: the direct kernel needs AVX-512 or AVX2 with FMA"));
    }
    let (w, o_stride, i_stride) = stored_2d(weight)?;
    let lines = with_slices(&[&w], |s| conv_taps::pack_panels(s[0], in_dim, out_dim, (i_stride, o_stride)))?;
    Ok(Panels { lines, in_dim, out_dim })
}

/// Whether [`linear_panels`] runs the f32 product of an input shaped `dims` (its last dim
/// `in_dim`) with an [`out_dim`, `in_dim`] weight, and pays: on AVX-512 or AVX2, for products
/// whose every entry `gemm` sums in depth blocks the panels reproduce
/// ([`gemm::depth_block`](super::gemm::depth_block); so not a single row, nor items of one row
/// each), with at most [`PANEL_ROWS`] rows in all. There `gemm`'s packing of the whole weight
/// on every call, which the panels do once, was 14 % of the text encoder's time (77 tokens per
/// prompt); with thousands of rows it is a small share, and `gemm`'s blocking of the rows wins.
pub fn panels_pay(dims: &[usize], in_dim: usize, out_dim: usize) -> bool {
    panel_block(dims, in_dim, out_dim).is_some()
}

/// The depth block of [`linear_panels`]' product where [`panels_pay`], else `None`.
fn panel_block(dims: &[usize], in_dim: usize, out_dim: usize) -> Option<usize> {
    let (rows, items) = row_blocks(dims);
    if !conv_taps::available() || dims.len() < 3 || rows * items > PANEL_ROWS {
        return None;
    }
    super::gemm::depth_block(rows, out_dim, in_dim)
}

/// Rows up to which [`panels_pay`] (measured on an AVX2 EPYC: at 154 rows the panels ran the
/// text encoder's layers at 175-185 GFLOP/s against `gemm`'s 150-170, at 512 they were level,
/// and at 4096 slower).
pub const PANEL_ROWS: usize = 256;

/// [`linear`] in f32 on a weight from [`pack_panels`]: `x` [items, rows, in] times the weight,
/// plus `bias` \[out\] and `residual` (shaped like the output), with every output element summed
/// as `gemm` sums it in [`linear`] (the same bits; the items' rows run as one product, the
/// threads splitting the panels). Only where [`panels_pay`]. Inference only (no backward).
pub fn linear_panels(x: &Tensor, panels: &Panels, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (in_dim, out_dim) = (panels.in_dim, panels.out_dim);
    let block = panel_block(&dims, in_dim, out_dim).filter(|_| dims.last() == Some(&in_dim));
    let Some(block) = block else {
        return Err(Error::invalid(format!("linear panels: input {dims:?} with a weight [{out_dim}, {in_dim}]")));
    };
    let out_shape = checked_out_shape("linear panels", &dims, out_dim, bias, residual)?;
    let (rows, items) = row_blocks(&dims);
    let mut ts = vec![x];
    ts.extend(bias);
    ts.extend(residual);
    let out = with_slices(&ts, |s| {
        let bs = bias.map(|_| s[1]);
        let rs = residual.map(|_| s[s.len() - 1]);
        let mut out = uninit(rows * items * out_dim);
        let parallel = threads() > 1;
        let start = bf16::Start::Fill { bias: bs.map(bf16::Bias::Columns), residual: rs };
        let preloaded = start.preload(&mut out, out_dim, parallel);
        conv_taps::panels(&panels.lines, out_dim, in_dim, block, s[0], in_dim, rows * items, &mut out, out_dim, preloaded, parallel);
        out
    })?;
    tensor(out, &out_shape)
}

/// The output shape of a linear layer with `out_dim` outputs on an input shaped `dims`, after
/// checking the bias and residual against it.
fn checked_out_shape(what: &str, dims: &[usize], out_dim: usize, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Vec<usize>> {
    check_per_channel(what, "bias", bias, out_dim)?;
    let mut out_shape = dims.to_vec();
    *out_shape.last_mut().ok_or_else(|| Error::invalid(format!("{what}: scalar input")))? = out_dim;
    if let Some(r) = residual {
        if r.dims() != out_shape.as_slice() {
            return Err(Error::invalid(format!("{what}: residual {:?} vs output {out_shape:?}", r.dims())));
        }
    }
    Ok(out_shape)
}

/// The same weight [out, in] stored input-major, as [in, out] in memory (a transposed view, so
/// every op still sees the usual shape). [`linear`] then reads it in place instead of repacking
/// it into gemm's panels on every call, which costs as much as the product itself when an item
/// has few rows (the text encoder's 77 tokens). The results are the same bytes.
pub fn in_major(weight: &Tensor) -> Result<Tensor> {
    weight.dims2()?;
    Ok(weight.t()?.contiguous()?.t()?)
}

/// Whether `weight` [out, in] is stored input-major (as [`in_major`] makes it).
pub fn is_in_major(weight: &Tensor) -> bool {
    !weight.is_contiguous() && weight.t().is_ok_and(|t| t.is_contiguous())
}

/// Whether products of `rows` rows with an [out, in] weight read an input-major weight in place
/// (forward and backward) and keep the usual layout's bytes. gemm sums one-row products and
/// products with at most 256 outputs in kernels of their own, whose order depends on the
/// layout; those read the usual layout, from a copy.
pub fn reads_in_major(rows: usize, in_dim: usize, out_dim: usize) -> bool {
    rows > 1 && rows * in_dim.min(out_dim) > 256
}

/// Whether one gemm over the rows of several items gives every output the bits of a gemm over
/// its own item's `rows` rows, depth `k` and `n` columns: where the item's product is summed
/// in one chain over the whole depth ([`gemm::one_block`]), whatever the row count; other
/// shapes are left per item.
pub(crate) fn merged_rows_keep_bits(rows: usize, k: usize, n: usize) -> bool {
    super::gemm::one_block(rows, n, k)
}

/// A 2-D tensor's data as stored and its (row, column) strides: a transposed view is read in
/// place, anything else is made contiguous.
fn stored_2d(t: &Tensor) -> Result<(Tensor, usize, usize)> {
    let (r, c) = t.dims2()?;
    Ok(if t.is_contiguous() {
        (t.clone(), c, 1)
    } else if t.t()?.is_contiguous() {
        (t.t()?, 1, r)
    } else {
        (t.contiguous()?, c, 1)
    })
}

/// `lhs` [items·rows, k] times `rhs` [k, n] -> [items·rows, n], where every item's `rows` rows
/// get the bits of a product of their own (candle's matmul of that item: same gemm shape and
/// strides). One gemm over all rows where that keeps the bits (`merged_rows_keep_bits`),
/// else one single-threaded gemm per item, the items in parallel. For the trained layers'
/// forward pass and input gradient (`nn::linear`), where the batch is many small products.
pub fn item_products(lhs: &Tensor, rhs: &Tensor, items: usize) -> Result<Tensor> {
    let (total, k) = lhs.dims2()?;
    let (k2, n) = rhs.dims2()?;
    if k2 != k || items == 0 || total % items != 0 {
        return Err(Error::invalid(format!("item_products: {:?} x {:?} in {items} items", lhs.dims(), rhs.dims())));
    }
    let (r, r_rs, r_cs) = stored_2d(rhs)?;
    let out = with_slices(&[lhs, &r], |s| item_products_slices(s[0], s[1], (r_rs, r_cs), total, k, n, items))?;
    tensor(out, &[total, n])
}

/// [`item_products`] on slices: `lhs` [total, k] row-major times the [k, n] matrix `rhs` read
/// with (row, column) `strides` (as stored: (n, 1), or (1, k) for a transposed view), in
/// `items` items of `total / items` rows.
pub(crate) fn item_products_slices(lhs: &[f32], rhs: &[f32], strides: (usize, usize), total: usize, k: usize, n: usize, items: usize) -> Vec<f32> {
    let rows = total / items;
    let (r_rs, r_cs) = strides;
    let mut out = uninit(total * n);
    if out.is_empty() {
        return out;
    }
    if k == 0 {
        out.fill(0.0);
        return out;
    }
    if merged_rows_keep_bits(rows, k, n) {
        unsafe { sgemm(total, n, k, out.as_mut_ptr(), n, 1, false, lhs.as_ptr(), k, 1, rhs.as_ptr(), r_rs, r_cs, 1.0, threads()) };
    } else {
        per_item(&mut out, items, |i, dst| unsafe {
            sgemm(rows, n, k, dst.as_mut_ptr(), n, 1, false, lhs[i * rows * k..].as_ptr(), k, 1, rhs.as_ptr(), r_rs, r_cs, 1.0, 1)
        });
    }
    out
}

/// The sum over items of `lhs_iᵀ · rhs_i` (`lhs` [items·rows, m], `rhs` [items·rows, n], each
/// item `rows` rows) -> [m, n], with the bits of candle's per-item products added one by one,
/// the last item first (the order of candle's backward over per-item products). With 3 to 512
/// rows per item each product is one depth block of gemm's usual kernels, which add it to what
/// they read from the destination with one rounding: exactly the separate addition, and the sum
/// the direct kernel (`conv_taps`) makes on AVX-512 or AVX2. Other shapes are added from a scratch
/// product. For a trained linear layer's weight gradient.
pub fn item_products_tn_sum(lhs: &Tensor, rhs: &Tensor, items: usize) -> Result<Tensor> {
    let (total, m) = lhs.dims2()?;
    let (total2, n) = rhs.dims2()?;
    if total2 != total || items == 0 || total % items != 0 {
        return Err(Error::invalid(format!("item_products_tn_sum: {:?}, {:?} in {items} items", lhs.dims(), rhs.dims())));
    }
    let rows = total / items;
    let out = with_slices(&[lhs, rhs], |s| {
        let (a, b) = (s[0], s[1]);
        let mut out = vec![0f32; m * n];
        if out.is_empty() || rows == 0 {
            return out;
        }
        let in_gemm = (3..=512).contains(&rows) && m >= 2 && n >= 2;
        if in_gemm && conv_taps::applies(m, rows, n) {
            // The same sum through the direct kernel, each item a "tap" (the last item first),
            // which keeps a tile of the result in registers across all items instead of
            // calling gemm once per item.
            let at = |stride: usize| (0..items).rev().map(|i| i * rows * stride).collect::<Vec<_>>();
            let parallel = threads() > 1;
            if conv_taps::planar_pays(n) {
                // W_t[a, r] = lhs_i[r, a], X_t[r, b] = rhs_i[r, b]; the result [m, n].
                conv_taps::conv_taps(a, &at(m), m, rows, b, n, &at(n), n, &mut out, false, parallel, conv_taps::Layout::Planar);
            } else {
                // Roles swapped (W_t[b, r] = rhs_i[r, b], X_t[r, a] = lhs_i[r, a]) and the
                // result written channels-last, [m, n] again.
                conv_taps::conv_taps(b, &at(n), n, rows, a, m, &at(m), m, &mut out, false, parallel, conv_taps::Layout::ChannelsLast);
            }
            return out;
        }
        let mut scratch = if in_gemm { Vec::new() } else { uninit(m * n) };
        for (j, i) in (0..items).rev().enumerate() {
            let (ai, bi) = (a[i * rows * m..].as_ptr(), b[i * rows * n..].as_ptr());
            let into_out = j == 0 || in_gemm;
            let dst = if into_out { out.as_mut_ptr() } else { scratch.as_mut_ptr() };
            // The transposed item [rows, m] is read as [m, rows] with strides (1, m), as candle passes it.
            unsafe { sgemm(m, n, rows, dst, n, 1, j > 0 && into_out, ai, 1, m, bi, n, 1, 1.0, threads()) };
            if !into_out {
                for (o, d) in out.iter_mut().zip(&scratch) {
                    *o += *d;
                }
            }
        }
        out
    })?;
    tensor(out, &[m, n])
}

/// (rows per item, items) of an input of shape `dims`: a rank-3+ input is a batch of items of
/// `dims[1..-1]` rows each; a 2-D input is items of one row.
pub(crate) fn row_blocks(dims: &[usize]) -> (usize, usize) {
    let in_dim = dims.last().copied().unwrap_or(0);
    let total_rows = dims.iter().product::<usize>() / in_dim.max(1);
    let rows = if dims.len() >= 3 { total_rows / dims[0].max(1) } else { 1 };
    let items = if rows == 0 { 0 } else { total_rows / rows };
    (rows, items)
}

/// Whether [`linear`] computes an input of shape `dims` row by row in f32 (several items of one
/// row each, e.g. the time embedding), ignoring any packed weight: callers need not make one.
pub fn rowwise(dims: &[usize]) -> bool {
    let (rows, items) = row_blocks(dims);
    rows == 1 && items > 1
}

/// Token features from an NCHW map through a pointwise layer: `x` [b, c, h, w], `weight`
/// [cout, c] (or [cout, c, 1, 1]), `bias` \[cout\] -> [b, h*w, cout]; the transpose is folded
/// into the product's strides. With `packed` (the weight from [`pack_weight`], as a linear
/// layer's) the product takes bf16 inputs with f32 accumulation. Inference only.
pub fn pointwise_to_tokens(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, packed: Option<&PackedLinear>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let cout = weight.dim(0)?;
    if weight.elem_count() != cout * c {
        return Err(Error::invalid(format!("pointwise_to_tokens: input {:?}, weight {:?}", x.dims(), weight.dims())));
    }
    check_per_channel("pointwise_to_tokens", "bias", bias, cout)?;
    if let Some(pw) = packed {
        if (pw.planes.k_pairs, pw.planes.plane) != (c.div_ceil(2), cout) {
            return Err(Error::invalid(format!("pointwise_to_tokens: packed weight does not match {:?}", weight.dims())));
        }
    }
    let hw = h * w;
    let mut ts = vec![x, weight];
    ts.extend(bias);
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let bs = bias.map(|_| s[2]);
        let mut out = uninit(b * hw * cout);
        if out.is_empty() {
            return out;
        }
        let nt = if b > 1 { 1 } else { threads() };
        let one = |bi: usize, dst: &mut [f32]| {
            let start = bf16::Start::Fill { bias: bs.map(bf16::Bias::Columns), residual: None };
            if let Some(pw) = packed {
                // The map's transpose as the left operand: token r's channel k is x[k, r].
                let a = bf16::PackedA::from_tap_major(pw.kernel, hw, 1, c, &xs[bi * c * hw..][..c * hw]);
                bf16::gemm_taps(&a, &pw.planes, &[0], cout, dst, cout, start, nt > 1).expect("shapes checked above");
                return;
            }
            let acc = start.preload(dst, cout, nt > 1);
            unsafe { sgemm(hw, cout, c, dst.as_mut_ptr(), cout, 1, acc, xs[bi * c * hw..].as_ptr(), 1, hw, ws.as_ptr(), 1, c, 1.0, nt) };
        };
        per_item(&mut out, b, one);
        out
    })?;
    tensor(out, &[b, hw, cout])
}

/// The inverse: `t` [b, h*w, c] through a pointwise layer (`weight` [cout, c] or
/// [cout, c, 1, 1], `bias` \[cout\]) into NCHW [b, cout, h, w], plus `residual` (NCHW). With
/// `packed` (the weight as a 1x1 convolution's, [`super::conv::pack_weight`]) the product takes
/// bf16 inputs with f32 accumulation. Inference only.
#[allow(clippy::too_many_arguments)]
pub fn pointwise_from_tokens(t: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, h: usize, w: usize, packed: Option<&bf16::PackedA>) -> Result<Tensor> {
    let (b, hw, c) = t.dims3()?;
    let cout = weight.dim(0)?;
    if weight.elem_count() != cout * c || hw != h * w {
        return Err(Error::invalid(format!("pointwise_from_tokens: tokens {:?}, weight {:?}, {h}x{w}", t.dims(), weight.dims())));
    }
    check_per_channel("pointwise_from_tokens", "bias", bias, cout)?;
    if let Some(r) = residual {
        if r.dims() != [b, cout, h, w] {
            return Err(Error::invalid(format!("pointwise_from_tokens: residual {:?}", r.dims())));
        }
    }
    if let Some(pw) = packed {
        if (pw.m, pw.taps, pw.k_pairs) != (cout, 1, c.div_ceil(2)) {
            return Err(Error::invalid(format!("pointwise_from_tokens: packed weight does not match {:?}", weight.dims())));
        }
    }
    let mut ts = vec![t, weight];
    ts.extend(bias);
    ts.extend(residual);
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let bs = bias.map(|_| s[2]);
        let rs = residual.map(|_| s[s.len() - 1]);
        let mut out = uninit(b * cout * hw);
        if out.is_empty() {
            return out;
        }
        let nt = if b > 1 { 1 } else { threads() };
        let one = |bi: usize, dst: &mut [f32]| {
            let res = rs.map(|r| &r[bi * cout * hw..(bi + 1) * cout * hw]);
            let start = bf16::Start::Fill { bias: bs.map(bf16::Bias::Rows), residual: res };
            if let Some(pw) = packed {
                // The tokens' transpose as the right operand: column r holds token r's channels.
                let b = PairPlanes::panels_from_positions(&xs[bi * hw * c..][..hw * c], c, hw, c);
                bf16::gemm_taps(pw, &b, &[0], hw, dst, hw, start, nt > 1).expect("shapes checked above");
                return;
            }
            let acc = start.preload(dst, hw, nt > 1);
            unsafe { sgemm(cout, hw, c, dst.as_mut_ptr(), hw, 1, acc, ws.as_ptr(), c, 1, xs[bi * hw * c..].as_ptr(), 1, c, 1.0, nt) };
        };
        per_item(&mut out, b, one);
        out
    })?;
    tensor(out, &[b, cout, h, w])
}

/// A linear layer's weight packed for the bf16 path of [`linear`]: the right operand, and the
/// kernel the inputs are packed for per call.
pub struct PackedLinear {
    pub planes: PairPlanes,
    pub kernel: bf16::Kernel,
}

/// `weight` [out, in] packed for the bf16 path of [`linear`] on `kernel` (done once per layer).
pub fn pack_weight(weight: &Tensor, kernel: bf16::Kernel) -> Result<PackedLinear> {
    let (out_dim, in_dim) = weight.dims2()?;
    // An input-major weight (see [`in_major`]) already holds the planes' rows, [in, out], in
    // its storage: converted 16 values at a time, without the element-by-element copy that
    // `with_slices` makes of the transposed view.
    let planes = if is_in_major(weight) {
        with_slices(&[&weight.t()?], |s| PairPlanes::from_rows(s[0], in_dim, out_dim, out_dim))?
    } else {
        with_slices(&[weight], |s| PairPlanes::from_fn(in_dim, out_dim, |i, o| s[0][o * in_dim + i]))?
    };
    // Panels for either kernel: a column block of 32 reads 128 bytes per pair row, and whole
    // rows a plane apart (3 or 12 KiB for 768 or 3 072 outputs, 20-40 KiB for the UNet's widest
    // feed-forward layers) put the 16 rows of a tile load into one or a few cache sets. The bits
    // are the same.
    let planes = planes.into_panels();
    Ok(PackedLinear { planes, kernel })
}

#[cfg(test)]
mod tests {
    use super::bf16::Kernel;
    use crate::kernels::testing::{rel_l2 as rel, values as vals, wave};

    #[test]
    fn amx_linear_items_in_one_product_keep_their_own_bits() {
        // Where the CPU has no AMX the tile product is emulated (see `bf16::gemm_taps`). Three
        // items of 45 rows share tile blocks in one product; each alone gives the same bits.
        if crate::kernels::testing::without_bf16() {
            return;
        }
        let (items, rows, k, out) = (3, 45, 67, 53);
        let (x, w) = (wave(1, &[items, rows, k], 1.0), wave(2, &[out, k], 0.1));
        let (bias, res) = (wave(3, &[out], 1.0), wave(4, &[items, rows, out], 1.0));
        let packed = super::pack_weight(&w, Kernel::Amx).unwrap();
        let batch = vals(&super::linear(&x, &w, Some(&bias), Some(&res), Some(&packed)).unwrap());
        for i in 0..items {
            let one = |t: &candle_core::Tensor| t.narrow(0, i, 1).unwrap();
            let alone = vals(&super::linear(&one(&x), &w, Some(&bias), Some(&one(&res)), Some(&packed)).unwrap());
            let part = &batch[i * rows * out..(i + 1) * rows * out];
            assert!(alone.iter().zip(part).all(|(p, q)| p.to_bits() == q.to_bits()), "item {i} depends on the batch");
        }
        let avx = super::pack_weight(&w, Kernel::Avx512).unwrap();
        let reference = vals(&super::linear(&x, &w, Some(&bias), Some(&res), Some(&avx)).unwrap());
        let e = rel(&batch, &reference);
        assert!(e < 1e-6, "AMX items in one product vs AVX-512: {e}");
    }

    #[test]
    fn the_amx_layouts_pointwise_projections_match_the_avx512_ones() {
        // Where the CPU has no AMX the tile product is emulated (see `bf16::gemm_taps`), so the
        // AMX path's packing of the map's transpose and of the tokens is checked on every CPU
        // with AVX-512 BF16.
        if crate::kernels::testing::without_bf16() {
            return;
        }
        let t = |seed: usize, shape: &[usize]| wave(seed, shape, 1.0);
        // Partial row and column blocks both ways, an odd channel count, one image and two.
        for (b, c, cout, h, w) in [(1, 37, 45, 7, 9), (2, 70, 33, 6, 6)] {
            let (x, tokens) = (t(1, &[b, c, h, w]), t(2, &[b, h * w, c]));
            let (wt, bias, res) = (t(3, &[cout, c, 1, 1]), t(4, &[cout]), t(5, &[b, cout, h, w]));
            let w2 = wt.reshape((cout, c)).unwrap();
            let to = |k: Option<Kernel>| {
                let p = k.map(|k| super::pack_weight(&w2, k).unwrap());
                vals(&super::pointwise_to_tokens(&x, &wt, Some(&bias), p.as_ref()).unwrap())
            };
            let from = |k: Option<Kernel>| {
                let p = k.map(|k| super::super::conv::pack_weight(&wt, k).unwrap());
                vals(&super::pointwise_from_tokens(&tokens, &wt, Some(&bias), Some(&res), h, w, p.as_ref()).unwrap())
            };
            for (what, amx, avx, f32s) in [("to tokens", to(Some(Kernel::Amx)), to(Some(Kernel::Avx512)), to(None)), ("from tokens", from(Some(Kernel::Amx)), from(Some(Kernel::Avx512)), from(None))] {
                // The same rounded inputs: only the order of f32 sums differs.
                let (e, e32) = (rel(&amx, &avx), rel(&amx, &f32s));
                eprintln!("{what} {c}->{cout}, {b} images: AMX layout vs AVX-512 {e:.2e}, vs f32 {e32:.2e}");
                assert!(e < 1e-5, "{what}: AMX vs AVX-512 {e}");
                assert!(e32 > 1e-5 && e32 < 2e-2, "{what}: AMX vs f32 {e32}");
            }
        }
    }
}
