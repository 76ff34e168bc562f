//! Building blocks the VAE and the UNet share: convolutions, group norms, the ResNet block and
//! single-head spatial attention, loaded from [`Weights`] by name.
//!
//! On f32 CPU tensors they run the sampler's own kernels ([`super::kernels`]: convolutions as
//! im2col + gemm, fused attention, single-pass norms); on other dtypes and devices, or with
//! `LORATOOL_CANDLE_KERNELS=1`, candle's ops.

use super::kernels::{self, own_or_candle};
use super::weights::{candle_error, Part, Weights};
use crate::Result;
use candle_core::{Module, Tensor};

/// A linear layer, its weight transposed once at load so every call is a plain matmul.
pub struct Linear {
    /// `[in, out]`.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `prefix.weight` (`[out, in]`) and `prefix.bias` when the checkpoint has one.
    pub fn load(w: &Weights, part: Part, prefix: &str) -> Result<Linear> {
        let weight_t = w.get_transposed(part, &format!("{prefix}.weight"))?;
        let bias_name = format!("{prefix}.bias");
        let bias = match w.has(part, &bias_name) {
            true => Some(w.get(part, &bias_name)?),
            false => None,
        };
        Ok(Linear { weight_t, bias })
    }

    /// The input width.
    pub fn in_features(&self) -> usize {
        self.weight_t.dims()[0]
    }

    /// `x` is `[…, in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        own_or_candle(
            || kernels::linear(x, &self.weight_t, self.bias.as_ref()),
            || self.forward_candle(x),
        )
    }

    fn forward_candle(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match x.rank() {
            2 => x.matmul(&self.weight_t)?,
            _ => x.broadcast_matmul(&self.weight_t)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, part: Part, prefix: &str, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: w.get(part, &format!("{prefix}.weight"))?,
            bias: w.get(part, &format!("{prefix}.bias"))?,
            eps: eps as f32,
        })
    }

    /// Over the last axis.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        own_or_candle(
            || kernels::norm::layer_norm(x, &self.weight, &self.bias, self.eps),
            || candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps),
        )
    }
}

/// Multi-head scaled dot-product attention of projected `q` over `k`/`v` (diffusers' `Attention`, LDM's
/// `CrossAttention`, CLIP's self-attention with its causal `mask` added to the scores),
/// `[batch, tokens, width]` in and out.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    // The fused kernel takes no mask; CLIP's causal attention over 77 tokens is small.
    match mask {
        None => own_or_candle(
            || kernels::attention::multi_head_attention(q, k, v, heads),
            || attention_candle(q, k, v, heads, None),
        ),
        Some(_) => attention_candle(q, k, v, heads, mask),
    }
}

fn attention_candle(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let q = (split(q, n)? * (1.0 / (d as f64).sqrt()))?;
    let k = split(k, m)?;
    let v = split(v, m)?;
    let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, inner))
}

pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// `prefix.weight` (`[out, in, k, k]`) and `prefix.bias`; 3×3 kernels are padded by 1.
    pub fn load(w: &Weights, part: Part, prefix: &str, stride: usize) -> Result<Conv2d> {
        let weight = w.get(part, &format!("{prefix}.weight"))?;
        let bias = w.get(part, &format!("{prefix}.bias"))?;
        let k = weight.dims().last().copied().unwrap_or(1);
        let config = candle_nn::Conv2dConfig {
            padding: k / 2,
            stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        Ok(Conv2d {
            inner: candle_nn::Conv2d::new(weight, Some(bias), config),
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let stride = self.inner.config().stride;
        own_or_candle(
            || kernels::conv::conv2d(x, self.inner.weight(), self.inner.bias(), stride),
            || self.inner.forward(x),
        )
    }
}

pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn load(
        w: &Weights,
        part: Part,
        prefix: &str,
        groups: usize,
        eps: f64,
    ) -> Result<GroupNorm> {
        let weight = w.get(part, &format!("{prefix}.weight"))?;
        let bias = w.get(part, &format!("{prefix}.bias"))?;
        let channels = weight.dims1().map_err(|e| candle_error(prefix, e))?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)
            .map_err(|e| candle_error(prefix, e))?;
        Ok(GroupNorm {
            inner,
            weight,
            bias,
            groups,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm(x, false)
    }

    /// The norm followed by SiLU, as every ResNet block and the models' output heads use it: in
    /// the kernel, one pass.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm(x, true)
    }

    fn norm(&self, x: &Tensor, then_silu: bool) -> candle_core::Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        own_or_candle(
            || kernels::norm::group_norm(x, w, b, self.groups, self.eps, then_silu),
            || match then_silu {
                true => self.inner.forward(x)?.silu(),
                false => self.inner.forward(x),
            },
        )
    }
}

/// LDM's `ResnetBlock` (diffusers `ResnetBlock2D`): norm → SiLU → conv, twice, plus the input
/// (through a 1×1 `nin_shortcut` when the width changes). `temb` is the UNet's time embedding,
/// already projected to the block's width; the VAE has none.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

/// The names a ResNet block's parts have in one naming scheme.
pub struct ResnetNames {
    pub norm1: &'static str,
    pub conv1: &'static str,
    pub norm2: &'static str,
    pub conv2: &'static str,
    pub shortcut: &'static str,
}

/// LDM's names (`nin_shortcut`).
pub const LDM_RESNET: ResnetNames = ResnetNames {
    norm1: "norm1",
    conv1: "conv1",
    norm2: "norm2",
    conv2: "conv2",
    shortcut: "nin_shortcut",
};

impl ResnetBlock {
    pub fn load(
        w: &Weights,
        part: Part,
        prefix: &str,
        names: &ResnetNames,
        groups: usize,
        eps: f64,
    ) -> Result<ResnetBlock> {
        let p = |n: &str| format!("{prefix}.{n}");
        let shortcut = match w.has(part, &format!("{}.weight", p(names.shortcut))) {
            true => Some(Conv2d::load(w, part, &p(names.shortcut), 1)?),
            false => None,
        };
        Ok(ResnetBlock {
            norm1: GroupNorm::load(w, part, &p(names.norm1), groups, eps)?,
            conv1: Conv2d::load(w, part, &p(names.conv1), 1)?,
            norm2: GroupNorm::load(w, part, &p(names.norm2), groups, eps)?,
            conv2: Conv2d::load(w, part, &p(names.conv2), 1)?,
            shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match temb {
            // `[batch, channels]` → `[batch, channels, 1, 1]`, added at every position.
            Some(t) => h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?,
            None => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// LDM's `AttnBlock` (the VAE's mid-block attention): one head over every position, q/k/v/out
/// as 1×1 convolutions.
pub struct SpatialSelfAttention {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    out: Conv2d,
}

impl SpatialSelfAttention {
    pub fn load(w: &Weights, part: Part, prefix: &str, groups: usize, eps: f64) -> Result<Self> {
        let p = |n: &str| format!("{prefix}.{n}");
        Ok(SpatialSelfAttention {
            norm: GroupNorm::load(w, part, &p("norm"), groups, eps)?,
            q: Conv2d::load(w, part, &p("q"), 1)?,
            k: Conv2d::load(w, part, &p("k"), 1)?,
            v: Conv2d::load(w, part, &p("v"), 1)?,
            out: Conv2d::load(w, part, &p("proj_out"), 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let flat = |t: Tensor| t.reshape((b, c, h * w));
        let (q, k, v) = (
            flat(self.q.forward(&n)?)?,
            flat(self.k.forward(&n)?)?,
            flat(self.v.forward(&n)?)?,
        );
        let attended = own_or_candle(
            || kernels::attention::spatial_attention(&q, &k, &v),
            || Self::attend_candle(q.clone(), k.clone(), v.clone()),
        )?;
        // [b, h·w, c] → [b, c, h, w].
        let attended = attended.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + self.out.forward(&attended)?
    }

    /// `[b, c, h·w]` q, k, v → `[b, h·w, c]`.
    fn attend_candle(q: Tensor, k: Tensor, v: Tensor) -> candle_core::Result<Tensor> {
        let c = q.dim(1)?;
        // [b, c, h·w] → [b, h·w, c] for q and v; k stays [b, c, h·w].
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let scores = (q.matmul(&k)? * (1.0 / (c as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)
    }
}

/// GEGLU's gate on the projection `ff` `[…, 2h]`: the first half times GELU (erf) of the second.
pub fn geglu(ff: &Tensor) -> candle_core::Result<Tensor> {
    own_or_candle(
        || kernels::activation::geglu(ff),
        || {
            let half = ff.dim(candle_core::D::Minus1)? / 2;
            let (a, b) = (
                ff.narrow(candle_core::D::Minus1, 0, half)?,
                ff.narrow(candle_core::D::Minus1, half, half)?,
            );
            a * b.gelu_erf()?
        },
    )
}
