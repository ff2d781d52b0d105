//! Multi-head self-attention on the packed qkv projection, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Multi-head self-attention core on the packed output of the qkv projection:
/// `[B, N, 3*C]` (q, k, v, each `heads` x `C/heads`, as timm's `Attention` lays them out) to
/// `[B, N, C]` = softmax(q k^T * scale) v, heads side by side. Reading q, k and v through strides
/// and writing the heads in place replaces timm's reshape/permute/contiguous copies, and the
/// backward recomputes the attention matrix per (batch, head) instead of keeping it.
pub struct Attention {
    pub heads: usize,
    pub scale: f32,
}

pub(super) struct Geometry {
    b: usize,
    n: usize,
    c: usize,
    dh: usize,
}

impl Attention {
    fn geometry(&self, l: &Layout) -> Result<Geometry> {
        let &[b, n, c3] = l.dims() else {
            candle_core::bail!("attention: expected [B, N, 3C], got {:?}", l.dims());
        };
        if c3 % (3 * self.heads) != 0 {
            candle_core::bail!("attention: {c3} is not 3 x {} heads", self.heads);
        }
        let c = c3 / 3;
        Ok(Geometry {
            b,
            n,
            c,
            dh: c / self.heads,
        })
    }

    /// q, k and v of (batch, head) inside the packed qkv buffer.
    fn qkv_views(&self, base: *const f32, g: &Geometry, b: usize, h: usize) -> [View; 3] {
        let rs = (3 * g.c) as isize;
        // SAFETY (for the callers): offsets stay inside [b, 0..N, 0..3C].
        [0, 1, 2].map(|part| View {
            ptr: unsafe { base.add(b * g.n * 3 * g.c + part * g.c + h * g.dh) },
            rs,
            cs: 1,
        })
    }

    /// scores = softmax(q k^T * scale) into `s` (N x N).
    unsafe fn probabilities(&self, s: &mut [f32], g: &Geometry, q: View, k: View) {
        matmul(
            g.n,
            g.n,
            g.dh,
            s.as_mut_ptr(),
            g.n as isize,
            q,
            k.t(),
            self.scale,
        );
        softmax_rows(s, g.n);
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "pretext-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = slice(s, l, self.name())?;
        let g = self.geometry(l)?;
        // SAFETY (both): the GEMMs overwrite the scores whole, and the heads' [n, dh] blocks
        // tile `out`.
        let mut out = unsafe { unzeroed(g.b * g.n * g.c) };
        let dst = Shared(out.as_mut_ptr());
        let base = qkv.as_ptr() as usize;
        (0..g.b * self.heads).into_par_iter().for_each_init(
            || unsafe { unzeroed(g.n * g.n) },
            |p, task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let [q, k, v] = self.qkv_views(base as *const f32, &g, b, h);
                // SAFETY: views stay inside qkv; this task alone writes head h of batch b.
                unsafe {
                    self.probabilities(p, &g, q, k);
                    let o = dst.at(b * g.n * g.c + h * g.dh);
                    let p = View {
                        ptr: p.as_ptr(),
                        rs: g.n as isize,
                        cs: 1,
                    };
                    matmul(g.n, g.dh, g.n, o, g.c as isize, p, v, 1.0);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.n, g.c))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionBwd {
                heads: self.heads,
                scale: self.scale,
            },
        )?))
    }
}

pub(super) struct AttentionBwd {
    heads: usize,
    scale: f32,
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "pretext-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let fwd = Attention {
            heads: self.heads,
            scale: self.scale,
        };
        let qkv = slice(qs, ql, self.name())?;
        let grad = slice(gs, gl, self.name())?;
        let g = fwd.geometry(ql)?;
        // SAFETY (all three): GEMMs overwrite P and dP whole, and each head's dq, dk and dv
        // blocks tile dqkv.
        let mut dqkv = unsafe { unzeroed(qkv.len()) };
        let dst = Shared(dqkv.as_mut_ptr());
        let (base, gbase) = (qkv.as_ptr() as usize, grad.as_ptr() as usize);
        let nn = g.n as isize;
        (0..g.b * self.heads).into_par_iter().for_each_init(
            || unsafe { (unzeroed(g.n * g.n), unzeroed(g.n * g.n)) },
            |(p, dp), task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let [q, k, v] = fwd.qkv_views(base as *const f32, &g, b, h);
                // SAFETY: views stay inside qkv/grad; this task alone writes the q, k and v
                // columns of head h in batch b's rows of dqkv.
                unsafe {
                    let d_o = View {
                        ptr: (gbase as *const f32).add(b * g.n * g.c + h * g.dh),
                        rs: g.c as isize,
                        cs: 1,
                    };
                    fwd.probabilities(p, &g, q, k);
                    let pv = View {
                        ptr: p.as_ptr(),
                        rs: nn,
                        cs: 1,
                    };
                    let [dq, dk, dv] = fwd
                        .qkv_views(dst.at(0) as *const f32, &g, b, h)
                        .map(|w| w.ptr as *mut f32);
                    let drs = (3 * g.c) as isize;
                    // dV = P^T dO
                    matmul(g.n, g.dh, g.n, dv, drs, pv.t(), d_o, 1.0);
                    // dP = dO V^T, then dS = P * (dP - rowsum(dP * P)) in place
                    matmul(g.n, g.n, g.dh, dp.as_mut_ptr(), nn, d_o, v.t(), 1.0);
                    simd(
                        #[inline(always)]
                        || {
                            for (dp, p) in dp.chunks_mut(g.n).zip(p.chunks(g.n)) {
                                let [dot] = sums(dp, p, |dp: f32, p| [dp * p]);
                                for (d, &pp) in dp.iter_mut().zip(p.iter()) {
                                    *d = pp * (*d - dot);
                                }
                            }
                        },
                    );
                    let ds = View {
                        ptr: dp.as_ptr(),
                        rs: nn,
                        cs: 1,
                    };
                    // dQ = scale dS K, dK = scale dS^T Q
                    matmul(g.n, g.dh, g.n, dq, drs, ds, k, self.scale);
                    matmul(g.n, g.dh, g.n, dk, drs, ds.t(), q, self.scale);
                }
            },
        );
        Ok((CpuStorage::F32(dqkv), ql.shape().clone()))
    }
}
