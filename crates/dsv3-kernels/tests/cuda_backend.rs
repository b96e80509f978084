//! Every method of the `Backend` trait on `Cuda` against the same call on `Cpu`, through one
//! generic function, so the wiring of the CUDA backend (buffers, resident weights, RoPE
//! table, plans, every op) is checked as model code uses it. Exact where both sides are exact
//! (copies, routing, plans, permutation, the bit-exact small ops); within f32 summation error
//! where the CPU's fast kernels sum in another order than the GPU's reference-order kernels.
//! Without the `cuda` feature or a GPU, `Cuda::new` is a typed error (checked in CI).

mod common;
mod cuda_common;

use common::max_abs_diff;
use cuda_common::gpu;
use dsv3_kernels::attention::{CacheWriteShape, DecodeParams, GatherShape, LatentPool, MlaDims, PrefillInputs, PrefillParams};
use dsv3_kernels::dense::Bf16Weight;
use dsv3_kernels::embed::EmbedShape;
use dsv3_kernels::fp8::calc_diff;
use dsv3_kernels::fp8::{ActQuantShape, Fp8Weight, ScaleFmt};
use dsv3_kernels::gating::RouteCfg;
use dsv3_kernels::gemm::{GemmPath, GemmShape};
use dsv3_kernels::norm::RowsShape;
use dsv3_kernels::permute::PlanShape;
use dsv3_kernels::rope::{RopeCfg, RopeLayout};
use dsv3_kernels::{Backend, Cpu, Cuda, KernelError};
use half::bf16;

#[test]
fn cuda_backend_new_is_a_typed_error_without_a_gpu() {
    match Cuda::new(0) {
        Ok(b) => assert_eq!(b.name(), "cuda"),
        Err(KernelError::CudaUnavailable(m)) => println!("no GPU here: {m}"),
        Err(e) => panic!("expected CudaUnavailable, got {e}"),
    }
}

/// The host inputs of one run.
struct Inputs {
    t: usize,
    h: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    norm_w: Vec<f32>,
    table: Vec<bf16>,
    ids: Vec<u32>,
    w: Fp8Weight,
    experts: Vec<Fp8Weight>,
    dense: Bf16Weight,
    logits: Vec<f32>,
    bias: Vec<f32>,
    route: RouteCfg,
    d: MlaDims,
    uk: [Bf16Weight; 2],
    uv: Bf16Weight,
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn inputs() -> Inputs {
    let mut s = 42u64;
    let mut v = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| scale * lcg(&mut s)).collect() };
    let (t, h) = (5, 256);
    let d = MlaDims { heads: 4, qk_nope: 32, qk_rope: 16, kv_lora: 64, v: 32 };
    let route = RouteCfg { n_experts: 16, top_k: 4, n_group: 4, topk_group: 2, ..RouteCfg::deepseek_v3() };
    Inputs {
        t,
        h,
        x: v(t * h, 2.0),
        y: v(t * h, 2.0),
        norm_w: v(h, 1.5),
        table: v(300 * h, 1.0).into_iter().map(bf16::from_f32).collect(),
        ids: vec![0, 299, 17, 17, 5],
        w: Fp8Weight::quantize(384, h, &v(384 * h, 0.1)).unwrap(),
        experts: (0..route.n_experts).map(|_| Fp8Weight::quantize(128, h, &v(128 * h, 0.1)).unwrap()).collect(),
        dense: Bf16Weight::from_f32(route.n_experts, h, &v(route.n_experts * h, 0.1)).unwrap(),
        logits: v(t * route.n_experts, 3.0),
        bias: v(route.n_experts, 0.2),
        route,
        d,
        uk: [Bf16Weight::from_f32(4 * 32, 64, &v(128 * 64, 0.2)).unwrap(), Bf16Weight::from_f32(4 * 32, 64, &v(128 * 64, 0.002)).unwrap()],
        uv: Bf16Weight::from_f32(4 * 32, 64, &v(128 * 64, 0.2)).unwrap(),
    }
}

/// Every trait method on `b`; returns (op, output as f32, exact?).
fn run<B: Backend>(b: &B, i: &Inputs) -> Vec<(&'static str, Vec<f32>, bool)> {
    let mut out = Vec::new();
    let f = |v: Vec<u32>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let (t, h) = (i.t, i.h);
    let rows = RowsShape { rows: t, cols: h };
    let x = b.upload(&i.x).unwrap();
    let y = b.upload(&i.y).unwrap();
    let nw = b.upload(&i.norm_w).unwrap();
    assert_eq!(b.len(&x), t * h);
    assert_eq!(b.download(&b.zeros::<u32>(3).unwrap()).unwrap(), vec![0; 3]);

    let mut acc = b.upload(&i.y).unwrap();
    b.add_assign(&mut acc, &x).unwrap();
    out.push(("add_assign", b.download(&acc).unwrap(), true));
    let mut o = b.zeros::<f32>(t * h).unwrap();
    b.rms_norm(&x, &nw, rows, 1e-6, &mut o).unwrap();
    out.push(("rms_norm", b.download(&o).unwrap(), false));
    let mut res = b.upload(&i.y).unwrap();
    b.add_rms_norm(&x, &mut res, &nw, rows, 1e-6, &mut o).unwrap();
    out.push(("add_rms_norm residual", b.download(&res).unwrap(), true));
    out.push(("add_rms_norm", b.download(&o).unwrap(), false));
    b.silu_mul(&x, &y, rows, &mut o).unwrap();
    out.push(("silu_mul", b.download(&o).unwrap(), true));
    b.softmax(&x, rows, &mut o).unwrap();
    out.push(("softmax", b.download(&o).unwrap(), true));
    let mut e = b.zeros::<f32>(i.ids.len() * h).unwrap();
    b.embedding(&b.upload(&i.table).unwrap(), EmbedShape { vocab: 300, dim: h }, &b.upload(&i.ids).unwrap(), &mut e).unwrap();
    out.push(("embedding", b.download(&e).unwrap(), true));
    let rope = b.rope_table(&RopeCfg { rope_head_dim: 16, ..RopeCfg::DEEPSEEK_V3 }, 4096).unwrap();
    let mut r = b.upload(&i.x).unwrap();
    b.apply_rope(&mut r, RopeLayout::contiguous(t, 16, 16), &b.upload(&[0u32, 1, 7, 4095, 100]).unwrap(), &rope).unwrap();
    out.push(("apply_rope", b.download(&r).unwrap(), true));
    let (mut q, mut sc) = (b.zeros::<u8>(t * h).unwrap(), b.zeros::<f32>(t * 2).unwrap());
    b.act_quant(&x, ActQuantShape { rows: t, cols: h }, ScaleFmt::Ue8m0, &mut q, &mut sc).unwrap();
    out.push(("act_quant codes", b.download(&q).unwrap().into_iter().map(f32::from).collect(), true));
    out.push(("act_quant scales", b.download(&sc).unwrap(), true));

    let w = b.upload_weight(i.w.view()).unwrap();
    assert_eq!(b.weight_shape(&w), (384, h));
    for (name, path) in [("gemm reference", GemmPath::Reference), ("gemm fp8", GemmPath::Fp8)] {
        let mut o = b.zeros::<f32>(t * 384).unwrap();
        b.gemm(&x, &w, GemmShape { m: t, n: 384, k: h }, path, &mut o).unwrap();
        out.push((name, b.download(&o).unwrap(), false));
    }
    let dw = b.upload_dense_weight(i.dense.view()).unwrap();
    let mut lo = b.zeros::<f32>(t * i.route.n_experts).unwrap();
    b.gemm_dense(&x, &dw, GemmShape { m: t, n: i.route.n_experts, k: h }, &mut lo).unwrap();
    out.push(("gemm_dense", b.download(&lo).unwrap(), false));

    // Routing on the same logits (uploaded, not computed): exact.
    let k = i.route.top_k;
    let (mut ids, mut wts) = (b.zeros::<u32>(t * k).unwrap(), b.zeros::<f32>(t * k).unwrap());
    b.route(&i.route, t, &b.upload(&i.logits).unwrap(), Some(&b.upload(&i.bias).unwrap()), &mut ids, &mut wts).unwrap();
    out.push(("route ids", f(b.download(&ids).unwrap()), true));
    out.push(("route weights", b.download(&wts).unwrap(), true));
    let plan = b.dispatch_plan(PlanShape { tokens: t, top_k: k, n_experts: i.route.n_experts }, &ids).unwrap();
    let offsets = b.plan_offsets(&plan).unwrap();
    out.push(("plan offsets", f(b.download(&offsets).unwrap()), true));
    let mut xp = b.zeros::<f32>(t * k * h).unwrap();
    b.permute(&plan, h, &x, &mut xp).unwrap();
    out.push(("permute", b.download(&xp).unwrap(), true));
    // The experts uploaded together, as the MoE layer does (on the GPU: one stack, whose
    // entries the simple grouped kernels read at their offsets; this shape has no sm90 kernel).
    let views: Vec<_> = i.experts.iter().map(|w| w.view()).collect();
    let ew = b.upload_weights(&views).unwrap();
    assert_eq!(ew.len(), i.route.n_experts);
    let er: Vec<_> = ew.iter().collect();
    let mut g = b.zeros::<f32>(t * k * 128).unwrap();
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        b.grouped_gemm_contiguous(&xp, &offsets, &er, path, &mut g).unwrap();
        out.push(("grouped contiguous", b.download(&g).unwrap(), false));
    }
    let mut yp = b.zeros::<f32>(t * k * h).unwrap();
    b.permute(&plan, h, &y, &mut yp).unwrap();
    let mut comb = b.zeros::<f32>(t * h).unwrap();
    b.unpermute(&plan, h, &yp, &wts, &mut comb).unwrap();
    out.push(("unpermute", b.download(&comb).unwrap(), true));
    // Masked: 16 experts x capacity 3, counts from the plan's offsets.
    let host_off = b.download(&offsets).unwrap();
    let counts: Vec<u32> = host_off.windows(2).map(|w| w[1] - w[0]).collect();
    let cap = counts.iter().copied().max().unwrap() as usize;
    let xm: Vec<f32> = (0..i.route.n_experts * cap * h).map(|j| ((j * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let mut gm = b.zeros::<f32>(i.route.n_experts * cap * 128).unwrap();
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        b.grouped_gemm_masked(&b.upload(&xm).unwrap(), &b.upload(&counts).unwrap(), cap, &er, path, &mut gm).unwrap();
        out.push(("grouped masked", b.download(&gm).unwrap(), false));
    }

    // MLA on a 2-page pool of 16-token pages: write 5 tokens, gather, absorb, decode, expand, prefill.
    let d = i.d;
    let pool_shape = LatentPool { num_pages: 2, page_size: 16, kv_lora: d.kv_lora, rope: d.qk_rope };
    let mut pool = b.zeros::<f32>(2 * 16 * d.latent()).unwrap();
    let kv = b.upload(&i.x[..t * d.latent()]).unwrap();
    let slots = b.upload(&[16u32, 17, 18, 0, 1]).unwrap(); // seq 0 on page 1 (3 tokens), seq 1 on page 0
    b.mla_cache_write(&kv, &nw.clone_prefix(b, d.kv_lora), 1e-6, &slots, CacheWriteShape { tokens: t, pool: pool_shape }, &mut pool)
        .unwrap();
    out.push(("mla_cache_write", b.download(&pool).unwrap(), false));
    let (tbl, lens) = (b.upload(&[1u32, 0]).unwrap(), b.upload(&[3u32, 2]).unwrap());
    let (mut ckv, mut kpe) = (b.zeros::<f32>(t * d.kv_lora).unwrap(), b.zeros::<f32>(t * d.qk_rope).unwrap());
    let gs = GatherShape { seqs: 2, max_blocks: 1, keys: t, pool: pool_shape };
    b.mla_cache_gather(&pool, &tbl, &lens, gs, &mut ckv, &mut kpe).unwrap();
    out.push(("mla_cache_gather c_kv", b.download(&ckv).unwrap(), false));
    out.push(("mla_cache_gather k_pe", b.download(&kpe).unwrap(), true));
    let qv = b.upload(&i.y[..t * d.heads * d.qk_head()]).unwrap();
    let (uk0, uk1, uv) = (
        b.upload_dense_weight(i.uk[0].view()).unwrap(),
        b.upload_dense_weight(i.uk[1].view()).unwrap(),
        b.upload_dense_weight(i.uv.view()).unwrap(),
    );
    let mut qa = b.zeros::<f32>(t * d.heads * d.latent()).unwrap();
    b.mla_absorb_q(&qv, &[&uk0, &uk1], d, t, &mut qa).unwrap();
    out.push(("mla_absorb_q", b.download(&qa).unwrap(), false));
    let dp = DecodeParams { batch: t, heads: d.heads, max_blocks: 1, pool: pool_shape, scale: 0.2 };
    let (dt, dl) = (b.upload(&[1u32, 1, 1, 0, 0]).unwrap(), b.upload(&[1u32, 2, 3, 1, 0]).unwrap());
    let mut ol = b.zeros::<f32>(t * d.heads * d.kv_lora).unwrap();
    b.mla_decode(&qa, &pool, &dt, &dl, &dp, &mut ol).unwrap();
    out.push(("mla_decode", b.download(&ol).unwrap(), false));
    let mut ov = b.zeros::<f32>(t * d.heads * d.v).unwrap();
    b.mla_expand_v(&ol, &uv, d, t, &mut ov).unwrap();
    out.push(("mla_expand_v", b.download(&ov).unwrap(), false));
    let mut kn = b.zeros::<f32>(t * d.heads * d.qk_nope).unwrap();
    b.gemm_dense(&ckv, &uk0, GemmShape { m: t, n: d.heads * d.qk_nope, k: d.kv_lora }, &mut kn).unwrap();
    let mut vv = b.zeros::<f32>(t * d.heads * d.v).unwrap();
    b.gemm_dense(&ckv, &uv, GemmShape { m: t, n: d.heads * d.v, k: d.kv_lora }, &mut vv).unwrap();
    let (qp, cq, ck) = (b.upload(&[0u32, 1, 2, 0, 1]).unwrap(), b.upload(&[0u32, 3, 5]).unwrap(), b.upload(&[0u32, 3, 5]).unwrap());
    let inp = PrefillInputs { q: &qv, k_nope: &kn, k_pe: &kpe, v: &vv, q_pos: &qp, cu_q: &cq, cu_k: &ck };
    let pp = PrefillParams { dims: d, seqs: 2, tokens: t, keys: t, scale: 0.2 };
    let mut po = b.zeros::<f32>(t * d.heads * d.v).unwrap();
    b.mla_prefill(inp, &pp, &mut po).unwrap();
    out.push(("mla_prefill", b.download(&po).unwrap(), false));
    out
}

/// The first `n` values of a buffer, as a new buffer (test helper through the trait only).
trait Prefix<B: Backend> {
    fn clone_prefix(&self, b: &B, n: usize) -> B::Buf<f32>;
}
impl<B: Backend> Prefix<B> for B::Buf<f32> {
    fn clone_prefix(&self, b: &B, n: usize) -> B::Buf<f32> {
        b.upload(&b.download(self).unwrap()[..n]).unwrap()
    }
}

/// The harness itself on the CPU (runs everywhere): every call is valid, so on a GPU a failure
/// is the CUDA backend's.
#[test]
fn backend_harness_runs_on_cpu() {
    let out = run(&Cpu, &inputs());
    assert_eq!(out.len(), 29);
    for (name, v, _) in &out {
        assert!(!v.is_empty() && v.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_backend_matches_cpu_op_by_op() {
    let Some(_) = gpu("cuda_backend_matches_cpu_op_by_op") else { return };
    let cuda = Cuda::new(0).unwrap();
    assert_eq!(cuda.name(), "cuda");
    let i = inputs();
    let (c, g) = (run(&Cpu, &i), run(&cuda, &i));
    assert_eq!(c.len(), g.len());
    for ((name, cv, exact), (gname, gv, _)) in c.iter().zip(&g) {
        assert_eq!(name, gname);
        assert_eq!(cv.len(), gv.len(), "{name}: lengths");
        if *exact {
            let same = cv.iter().zip(gv).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            assert!(same, "{name}: not bit-exact (max diff {})", max_abs_diff(cv, gv));
        } else {
            let scale = cv.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = max_abs_diff(cv, gv);
            assert!(err <= 1e-5 * scale + 1e-30 && calc_diff(cv, gv) < 1e-9, "{name}: max diff {err} (scale {scale})");
        }
        println!("{name:<26} ok ({} values)", cv.len());
    }
}
