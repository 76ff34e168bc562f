//! The GEGLU gate `a · GELU(b)` in one pass over the
//! projection's two halves (no narrowed copies, no separate GELU tensor).

use super::{applies, gelu_erf, read, tensor};
use candle_core::Tensor;
use rayon::prelude::*;

/// Values per parallel work item.
const ITEM: usize = 1 << 14;

/// GEGLU's gate on `ff` `[…, 2h]`: the first half times the erf-GELU of the second, `[…, h]`;
/// `None` when `ff` is not f32 on the CPU or its last axis is odd.
pub fn geglu(ff: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(ff) || ff.rank() == 0 {
        return Ok(None);
    }
    let mut dims = ff.dims().to_vec();
    let two_h = dims[dims.len() - 1];
    if !two_h.is_multiple_of(2) || two_h == 0 {
        return Ok(None);
    }
    let h = two_h / 2;
    *dims.last_mut().expect("rank ≥ 1") = h;
    let mut out = vec![0f32; ff.elem_count() / 2];
    let rows_per_item = (ITEM / two_h).max(1);
    read(ff, |ff| {
        out.par_chunks_mut(h * rows_per_item)
            .zip(ff.par_chunks(two_h * rows_per_item))
            .for_each(|(out, ff)| {
                for (o, row) in out.chunks_mut(h).zip(ff.chunks(two_h)) {
                    let (a, b) = row.split_at(h);
                    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                        *o = a * gelu_erf(*b);
                    }
                }
            })
    })?;
    tensor(out, &dims).map(Some)
}
