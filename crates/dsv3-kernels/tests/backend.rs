//! The op-level interface composes: a whole routed-expert MoE step written once, generically
//! over `Backend`, equals the same computation assembled token by token from the references.

use dsv3_kernels::backend::{Backend, Cpu};
use dsv3_kernels::fp8::Fp8Weight;
use dsv3_kernels::gating::{self, RouteCfg};
use dsv3_kernels::gemm::{GemmPath, GemmShape, reference as gemm_ref};
use dsv3_kernels::norm::RowsShape;
use dsv3_kernels::permute::PlanShape;
use dsv3_kernels::{Result, act};

struct Experts<B: Backend> {
    gate: Vec<B::Weight>,
    up: Vec<B::Weight>,
    down: Vec<B::Weight>,
}

/// Routed experts of one MoE layer, written only against the trait.
#[allow(clippy::too_many_arguments)] // a test helper: the inputs of one MoE step
fn moe_step<B: Backend>(
    b: &B,
    cfg: &RouteCfg,
    x: &B::Buf<f32>,
    logits: &B::Buf<f32>,
    bias: &B::Buf<f32>,
    ex: &Experts<B>,
    tokens: usize,
    hidden: usize,
    inter: usize,
    path: GemmPath,
) -> Result<Vec<f32>> {
    let k = cfg.top_k;
    let (mut idx, mut wts) = (b.zeros::<u32>(tokens * k)?, b.zeros::<f32>(tokens * k)?);
    b.route(cfg, tokens, logits, Some(bias), &mut idx, &mut wts)?;
    let plan = b.dispatch_plan(PlanShape { tokens, top_k: k, n_experts: cfg.n_experts }, &idx)?;
    let offsets = b.plan_offsets(&plan)?;
    let rows = tokens * k;
    let mut xp = b.zeros::<f32>(rows * hidden)?;
    b.permute(&plan, hidden, x, &mut xp)?;
    let (mut g, mut u, mut h) = (b.zeros::<f32>(rows * inter)?, b.zeros::<f32>(rows * inter)?, b.zeros::<f32>(rows * inter)?);
    b.grouped_gemm_contiguous(&xp, &offsets, &ex.gate.iter().collect::<Vec<_>>(), path, &mut g)?;
    b.grouped_gemm_contiguous(&xp, &offsets, &ex.up.iter().collect::<Vec<_>>(), path, &mut u)?;
    b.silu_mul(&g, &u, RowsShape { rows, cols: inter }, &mut h)?;
    let mut y = b.zeros::<f32>(rows * hidden)?;
    b.grouped_gemm_contiguous(&h, &offsets, &ex.down.iter().collect::<Vec<_>>(), path, &mut y)?;
    let mut out = b.zeros::<f32>(tokens * hidden)?;
    b.unpermute(&plan, hidden, &y, &wts, &mut out)?;
    b.download(&out)
}

#[test]
fn generic_moe_step_equals_token_by_token_reference() {
    let (tokens, hidden, inter) = (9, 256, 128);
    let cfg = RouteCfg { n_experts: 16, top_k: 4, n_group: 4, topk_group: 2, ..RouteCfg::deepseek_v3() };
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut rnd = move |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * s
            })
            .collect()
    };
    let mk = |r: &mut dyn FnMut(usize, f32) -> Vec<f32>, n: usize, k: usize| Fp8Weight::quantize(n, k, &r(n * k, 0.1)).unwrap();
    let gate: Vec<Fp8Weight> = (0..16).map(|_| mk(&mut rnd, inter, hidden)).collect();
    let up: Vec<Fp8Weight> = (0..16).map(|_| mk(&mut rnd, inter, hidden)).collect();
    let down: Vec<Fp8Weight> = (0..16).map(|_| mk(&mut rnd, hidden, inter)).collect();
    let x = rnd(tokens * hidden, 1.0);
    let logits = rnd(tokens * 16, 3.0);
    let bias = rnd(16, 0.5);

    let cpu = Cpu;
    let ex = Experts::<Cpu> { gate: gate.clone(), up: up.clone(), down: down.clone() };
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        let got = moe_step(&cpu, &cfg, &x, &logits, &bias, &ex, tokens, hidden, inter, path).unwrap();

        let (mut idx, mut wts) = (vec![0u32; tokens * 4], vec![0f32; tokens * 4]);
        gating::reference::route(&cfg, tokens, &logits, Some(&bias), &mut idx, &mut wts).unwrap();
        let mut want = vec![0f32; tokens * hidden];
        for t in 0..tokens {
            let xt = &x[t * hidden..(t + 1) * hidden];
            for j in 0..4 {
                let e = idx[t * 4 + j] as usize;
                let (mut g, mut u, mut h, mut y) = (vec![0f32; inter], vec![0f32; inter], vec![0f32; inter], vec![0f32; hidden]);
                gemm_ref::gemm(xt, gate[e].view(), GemmShape { m: 1, n: inter, k: hidden }, path, &mut g).unwrap();
                gemm_ref::gemm(xt, up[e].view(), GemmShape { m: 1, n: inter, k: hidden }, path, &mut u).unwrap();
                act::reference::silu_mul(&g, &u, RowsShape { rows: 1, cols: inter }, &mut h).unwrap();
                gemm_ref::gemm(&h, down[e].view(), GemmShape { m: 1, n: hidden, k: inter }, path, &mut y).unwrap();
                for c in 0..hidden {
                    want[t * hidden + c] += wts[t * 4 + j] * y[c];
                }
            }
        }
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0 && err <= 1e-4 * scale, "{path:?}: max err {err} vs max |y| {scale}");
    }
}
