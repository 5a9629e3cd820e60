//! Per-channel broadcast arithmetic for training: `x + p[c]` and `x * p[c]` over a tensor viewed
//! as (outer, channels, inner) — a bias or a norm's scale over NCHW's channel dim (inner = H·W)
//! or over the last dim of a token matrix (inner = 1) — and the per-channel sums that their
//! backward needs.
//!
//! candle's backward of a broadcast sums the gradient over the broadcast dims. When those are
//! not the trailing dims, its CPU reduction computes a div/mod index per element, on one
//! thread; that dominated a pretraining step. It adds the elements, in the source's row-major
//! order, into an accumulator that starts at zero. [`channel_sums`] adds them in that same
//! order per channel (each channel's sum stays one sequential chain), so the bits are
//! candle's; it only runs several channels' chains side by side, and blocks of channels in
//! parallel.
use rayon::prelude::*;

use super::io::uninit;

/// How `p` combines with `x` in [`channel_map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelOp {
    Add,
    Mul,
}

/// `x[o, c, i] op p[c]` for x of `outer * p.len() * inner` values.
pub fn channel_map(x: &[f32], p: &[f32], inner: usize, op: ChannelOp) -> Vec<f32> {
    let channels = p.len();
    let mut out = uninit(x.len());
    if x.is_empty() {
        return out;
    }
    // Whole (c, inner) rows per task, about 16 Ki values each.
    let row = channels * inner;
    let rows = (16384 / row.max(1)).max(1);
    out.par_chunks_mut(rows * row)
        .zip(x.par_chunks(rows * row))
        .for_each(|(d, s)| {
            for (d, s) in d.chunks_exact_mut(row).zip(s.chunks_exact(row)) {
                for ((d, s), &pc) in d.chunks_exact_mut(inner).zip(s.chunks_exact(inner)).zip(p) {
                    match op {
                        ChannelOp::Add => d.iter_mut().zip(s).for_each(|(d, &s)| *d = s + pc),
                        ChannelOp::Mul => d.iter_mut().zip(s).for_each(|(d, &s)| *d = s * pc),
                    }
                }
            }
        });
    out
}

/// Per channel, the sum of `g` over (outer, inner), added in row-major order into a zero
/// (candle's `sum_keepdim` over the broadcast dims, to the bit).
pub fn channel_sums(g: &[f32], channels: usize, inner: usize) -> Vec<f32> {
    sums(g.len(), channels, inner, |j| g[j])
}

/// Per channel, the sum of the rounded products `g * x` over (outer, inner), in
/// [`channel_sums`]' order (candle's gradient of a broadcast product's per-channel operand:
/// the product tensor, then its sum).
pub fn channel_sums_of_products(g: &[f32], x: &[f32], channels: usize, inner: usize) -> Vec<f32> {
    assert_eq!(
        g.len(),
        x.len(),
        "channel_sums_of_products: operands differ in length"
    );
    sums(g.len(), channels, inner, |j| g[j] * x[j])
}

fn sums(
    len: usize,
    channels: usize,
    inner: usize,
    value: impl Fn(usize) -> f32 + Sync,
) -> Vec<f32> {
    let mut acc = vec![0f32; channels];
    if len == 0 || channels == 0 || inner == 0 {
        return acc;
    }
    let outer = len / (channels * inner);
    // A block's chains advance in lockstep: contiguous (vectorisable) when inner = 1, otherwise
    // one stream per channel.
    let block = if inner == 1 { 256 } else { 16 };
    acc.par_chunks_mut(block).enumerate().for_each(|(bi, a)| {
        let c0 = bi * block;
        for o in 0..outer {
            for i in 0..inner {
                let base = (o * channels + c0) * inner + i;
                for (k, a) in a.iter_mut().enumerate() {
                    *a += value(base + k * inner);
                }
            }
        }
    });
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order candle's reduction uses: every element in row-major order into its channel.
    fn row_major_sums(v: &[f32], channels: usize, inner: usize) -> Vec<f32> {
        let mut acc = vec![0f32; channels];
        for (j, &x) in v.iter().enumerate() {
            acc[(j / inner) % channels] += x;
        }
        acc
    }

    fn values(n: usize) -> Vec<f32> {
        // Magnitudes spread over many binades, so a changed order changes the bits.
        (0..n)
            .map(|i| {
                ((i * 7919 % 1013) as f32 - 506.0)
                    * (1.0 + (i % 13) as f32 * 37.5).powi((i % 5) as i32 - 2)
            })
            .collect()
    }

    #[test]
    fn sums_follow_row_major_order_to_the_bit() {
        for &(outer, channels, inner) in
            &[(3, 5, 7), (2, 300, 1), (4, 33, 16), (1, 1, 1), (5, 17, 1)]
        {
            let g = values(outer * channels * inner);
            let x: Vec<f32> = values(g.len() + 3)[3..].to_vec();
            let want = row_major_sums(&g, channels, inner);
            let got = channel_sums(&g, channels, inner);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let prods: Vec<f32> = g.iter().zip(&x).map(|(a, b)| a * b).collect();
            let want = row_major_sums(&prods, channels, inner);
            let got = channel_sums_of_products(&g, &x, channels, inner);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn map_applies_the_channel_value() {
        let (outer, channels, inner) = (3, 4, 5);
        let x = values(outer * channels * inner);
        let p = [1.5f32, -2.0, 0.25, 3.0];
        let add = channel_map(&x, &p, inner, ChannelOp::Add);
        let mul = channel_map(&x, &p, inner, ChannelOp::Mul);
        for j in 0..x.len() {
            let c = (j / inner) % channels;
            assert_eq!(add[j].to_bits(), (x[j] + p[c]).to_bits());
            assert_eq!(mul[j].to_bits(), (x[j] * p[c]).to_bits());
        }
    }
}
