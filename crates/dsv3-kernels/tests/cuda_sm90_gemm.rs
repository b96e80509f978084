//! `sm90_fp8_gemm` (TMA + wgmma FP8 GEMM, dense and grouped) against the CPU fp8 path
//! (`gemm::gemm_fp8_quantized`: per-128 block sums promoted with both scales), and its routing.
//!
//! The host-side tests (routing heuristic, validation, the sources generated from the kernel
//! catalog) run everywhere. The GPU tests are ignored without a GPU; they check every
//! DeepSeek-V3 (N, K) at M in {1, 7, 64, 128, 129, 4096}, random grouped layouts (contiguous
//! and masked), bf16 output, and the fallback to the simple kernel: DeepGEMM's calc_diff
//! < 1e-3 against the CPU, no NaN or inf, zeros where the masked layout has no data, and the
//! fallback bit-exact. Large M is checked on sampled rows that cover every row block and both
//! consumer warpgroups' halves of it (the CPU side would otherwise dominate the GPU's time).

mod common;
mod cuda_common;

use cuda_common::{Rng, check_close, gpu, runner};
use dsv3_kernels::cuda::CudaDevice;
use dsv3_kernels::cuda::sm90_gemm::{self, SM90_KERNELS, Sm90Fallback, Sm90Layout, Sm90Out, Sm90Route};
use dsv3_kernels::fp8::Fp8WeightRef;
use dsv3_kernels::gemm::{self, GemmShape, V3_SHAPES};
use proptest::prelude::*;

const MS: &[usize] = &[1, 7, 64, 128, 129, 4096];

// ---------------------------------------------------------------------------------------------
// Host side (no GPU needed).
// ---------------------------------------------------------------------------------------------

#[test]
fn sm90_routes_every_v3_shape_by_m() {
    for &(n, k) in V3_SHAPES {
        for &m in MS {
            let p = sm90_gemm::plan(n, k, 1, Sm90Layout::Dense { m }).unwrap();
            let Sm90Route::Tma(c) = p.route else { panic!("{n}x{k} m={m}: {:?}", p.route) };
            assert_eq!((c.n, c.k, c.block_m), (n, k, if m <= 64 { 64 } else { 128 }), "m={m}");
            assert_eq!(p.tiles, m.div_ceil(c.block_m) * n.div_ceil(c.block_n));
            assert_eq!(p.rows, m);
        }
    }
}

#[test]
fn sm90_grouped_plans_count_tiles_per_group() {
    let offsets = [0u32, 0, 5, 300, 300, 365];
    let p = sm90_gemm::plan(4096, 7168, 5, Sm90Layout::Contiguous { offsets: &offsets }).unwrap();
    let Sm90Route::Tma(c) = p.route else { panic!("{:?}", p.route) };
    assert_eq!(c.block_m, 128, "the largest group has 295 rows");
    assert_eq!(p.tiles, (1 + 3 + 1) * 32);
    assert_eq!(p.rows, 365);
    let counts = [3u32, 0, 64, 17];
    let p = sm90_gemm::plan(7168, 2048, 4, Sm90Layout::Masked { counts: &counts, capacity: 100 }).unwrap();
    let Sm90Route::Tma(c) = p.route else { panic!("{:?}", p.route) };
    assert_eq!(c.block_m, 64, "no group has more than 64 rows");
    assert_eq!(p.tiles, 4 * 2 * 7168usize.div_ceil(c.block_n), "masked tiles cover the capacity (zeros past counts)");
    assert_eq!(p.rows, 400);
}

#[test]
fn sm90_falls_back_and_rejects_bad_shapes() {
    let fb = |n, k, g, l| sm90_gemm::plan(n, k, g, l).unwrap().route;
    assert_eq!(fb(7168, 7168, 1, Sm90Layout::Dense { m: 9 }), Sm90Route::Fallback(Sm90Fallback::Shape));
    assert_eq!(fb(384, 256, 1, Sm90Layout::Dense { m: 4096 }), Sm90Route::Fallback(Sm90Fallback::Shape));
    let counts = vec![1u32; 257];
    assert_eq!(fb(4096, 7168, 257, Sm90Layout::Masked { counts: &counts, capacity: 4 }), Sm90Route::Fallback(Sm90Fallback::Groups));
    // Errors, before any launch.
    assert!(sm90_gemm::plan(4096, 7000, 1, Sm90Layout::Dense { m: 1 }).is_err(), "k % 128");
    assert!(sm90_gemm::plan(4096, 7168, 2, Sm90Layout::Dense { m: 1 }).is_err(), "dense with two weights");
    assert!(sm90_gemm::plan(4096, 7168, 2, Sm90Layout::Contiguous { offsets: &[0, 5] }).is_err(), "offsets length");
    assert!(sm90_gemm::plan(4096, 7168, 2, Sm90Layout::Contiguous { offsets: &[1, 5, 9] }).is_err(), "offsets start");
    assert!(sm90_gemm::plan(4096, 7168, 2, Sm90Layout::Contiguous { offsets: &[0, 5, 4] }).is_err(), "offsets decrease");
    assert!(sm90_gemm::plan(4096, 7168, 2, Sm90Layout::Masked { counts: &[3, 9], capacity: 8 }).is_err(), "count > capacity");
    assert!(sm90_gemm::plan(4096, 7168, 0, Sm90Layout::Masked { counts: &[], capacity: 8 }).is_err(), "no groups");
}

/// The instantiation sources, embedded at compile time (so this also runs where only the test
/// binary is, as on the GPU machine).
/// The sources build.rs generates from the catalog instantiate exactly [`SM90_KERNELS`] (read
/// back from the text: entry point, launch bounds, template arguments), the generated wgmma
/// header has every tile width, and the catalog's (N, K) are exactly V3's.
#[test]
fn sm90_generated_sources_match_the_catalog() {
    use dsv3_kernels::cuda::sm90_gemm::catalog;
    let mut found = Vec::new();
    for (n, k) in catalog::sm90_shapes() {
        let src = catalog::cuda_source(n, k);
        for (i, _) in src.match_indices("fp8_gemm<") {
            let args = &src[i + 9..i + 9 + src[i + 9..].find('>').unwrap()];
            let v: Vec<usize> = args.split(',').map(|x| x.trim().parse().unwrap()).collect();
            let c = sm90_gemm::Sm90Kernel { n: v[0], k: v[1], block_m: v[2], block_n: v[3], stages: v[4] };
            assert_eq!((c.n, c.k), (n, k), "{}", catalog::source_name(n, k));
            assert!(src.contains(&format!("{}(", c.symbol())), "no entry point {}", c.symbol());
            assert!(src.contains(&format!("__launch_bounds__({}, 1)\n    {}(", c.threads(), c.symbol())), "{}: threads", c.symbol());
            found.push(c);
        }
    }
    found.sort_by_key(|c| (c.n, c.k, c.block_m));
    let mut table = SM90_KERNELS.to_vec();
    table.sort_by_key(|c| (c.n, c.k, c.block_m));
    assert_eq!(found, table);
    let header = catalog::wgmma_header();
    for c in SM90_KERNELS {
        assert!(header.contains(&format!("struct Wgmma<{}> {{", c.block_n)), "no wgmma wrapper for N = {}", c.block_n);
        assert!(header.contains(&format!("m64n{}k32.f32.e4m3.e4m3 {{%0,", c.block_n)));
        assert!(c.smem_bytes() <= catalog::SM90_MAX_SMEM, "{}: {} bytes of shared memory", c.symbol(), c.smem_bytes());
    }
    let mut shapes = catalog::sm90_shapes();
    let mut v3 = V3_SHAPES.to_vec();
    shapes.sort_unstable();
    v3.sort_unstable();
    assert_eq!(shapes, v3, "one pair of instantiations per V3 shape");
}

// ---------------------------------------------------------------------------------------------
// GPU.
// ---------------------------------------------------------------------------------------------

/// One group's operands on the host.
struct Weights {
    n: usize,
    k: usize,
    data: Vec<u8>,
    scale_inv: Vec<f32>,
}
impl Weights {
    fn random(rng: &mut Rng, groups: usize, n: usize, k: usize) -> Weights {
        Weights { n, k, data: rng.codes(groups * n * k), scale_inv: rng.scales(groups * n.div_ceil(128) * (k / 128)) }
    }
    fn get(&self, g: usize) -> Fp8WeightRef<'_> {
        let (d, s) = (self.n * self.k, self.n.div_ceil(128) * (self.k / 128));
        Fp8WeightRef::new(self.n, self.k, &self.data[g * d..(g + 1) * d], &self.scale_inv[g * s..(g + 1) * s]).unwrap()
    }
    fn all(&self) -> Vec<Fp8WeightRef<'_>> {
        (0..self.data.len() / (self.n * self.k)).map(|g| self.get(g)).collect()
    }
}

/// The CPU fp8 path on rows `rows` of A against weight `w`: `[rows.len(), N]`.
fn cpu_rows(a_q: &[u8], a_s: &[f32], k: usize, rows: &[usize], w: Fp8WeightRef<'_>) -> Vec<f32> {
    let kb = k / 128;
    let q: Vec<u8> = rows.iter().flat_map(|&r| a_q[r * k..(r + 1) * k].iter().copied()).collect();
    let s: Vec<f32> = rows.iter().flat_map(|&r| a_s[r * kb..(r + 1) * kb].iter().copied()).collect();
    let mut out = vec![0f32; rows.len() * w.rows()];
    gemm::gemm_fp8_quantized(&q, &s, w, GemmShape { m: rows.len(), n: w.rows(), k }, &mut out).unwrap();
    out
}

/// Rows to check of an m-row group: all of them up to 300, else per 128-row block the first,
/// last and middle rows of both 64-row halves, and the last row.
fn sample_rows(m: usize) -> Vec<usize> {
    if m <= 300 {
        return (0..m).collect();
    }
    let mut v: Vec<usize> = (0..m).filter(|r| [0, 37, 63, 64, 101, 127].contains(&(r % 128))).collect();
    if v.last() != Some(&(m - 1)) {
        v.push(m - 1);
    }
    v
}

fn gather(out: &[f32], n: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| out[r * n..(r + 1) * n].iter().copied()).collect()
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_sm90_fp8_gemm_dense_v3_shapes() {
    let Some(dev) = gpu("cuda_sm90_fp8_gemm_dense_v3_shapes") else { return };
    let mut rng = Rng(0x5eed_0006);
    for &(n, k) in V3_SHAPES {
        let w = Weights::random(&mut rng, 1, n, k);
        let wd = dev.upload_fp8_stack(&w.all()).unwrap();
        for &m in MS {
            let (a_q, a_s) = (rng.codes(m * k), rng.scales(m * k / 128));
            let (qd, sd) = (dev.upload(&a_q).unwrap(), dev.upload(&a_s).unwrap());
            let mut od = dev.zeros::<f32>(m * n).unwrap();
            let route = dev.sm90_fp8_gemm(&qd, &sd, &wd, Sm90Layout::Dense { m }, Sm90Out::F32(&mut od)).unwrap();
            assert!(matches!(route, Sm90Route::Tma(c) if c.block_m == if m <= 64 { 64 } else { 128 }), "{route:?}");
            let out = dev.download(&od).unwrap();
            let rows = sample_rows(m);
            check_close(&format!("{n}x{k} m={m}"), &gather(&out, n, &rows), &cpu_rows(&a_q, &a_s, k, &rows, w.get(0)));
            if m == 129 || m == 7 {
                // bf16 out is the f32 result rounded to nearest even, bit for bit.
                let mut bd = dev.zeros::<half::bf16>(m * n).unwrap();
                dev.sm90_fp8_gemm(&qd, &sd, &wd, Sm90Layout::Dense { m }, Sm90Out::Bf16(&mut bd)).unwrap();
                let b = dev.download(&bd).unwrap();
                let i = out.iter().zip(&b).position(|(f, b)| half::bf16::from_f32(*f).to_bits() != b.to_bits());
                assert!(i.is_none(), "{n}x{k} m={m}: bf16 element {i:?} is not bf16(f32)");
            }
        }
    }
}

/// Runs a grouped layout and checks every group against the CPU.
fn check_grouped(dev: &CudaDevice, w: &Weights, layout: Sm90Layout<'_>, rows: usize, rng: &mut Rng, what: &str) {
    let (n, k) = (w.n, w.k);
    let mut a_q = rng.codes(rows * k);
    let a_s = rng.scales(rows * k / 128);
    let spans: Vec<(usize, usize, usize)> = match layout {
        Sm90Layout::Contiguous { offsets } => {
            offsets.windows(2).map(|p| (p[0] as usize, (p[1] - p[0]) as usize, (p[1] - p[0]) as usize)).collect()
        }
        Sm90Layout::Masked { counts, capacity } => counts.iter().enumerate().map(|(e, &c)| (e * capacity, c as usize, capacity)).collect(),
        Sm90Layout::Dense { m } => vec![(0, m, m)],
    };
    // Rows without data hold NaN codes: they must not reach any output.
    for &(r0, data, owned) in &spans {
        a_q[(r0 + data) * k..(r0 + owned) * k].fill(0x7F);
    }
    let wd = dev.upload_fp8_stack(&w.all()).unwrap();
    let mut od = dev.upload(&vec![f32::NAN; rows * n]).unwrap();
    let route = dev.sm90_fp8_gemm(&dev.upload(&a_q).unwrap(), &dev.upload(&a_s).unwrap(), &wd, layout, Sm90Out::F32(&mut od)).unwrap();
    assert!(matches!(route, Sm90Route::Tma(_)), "{what}: {route:?}");
    let out = dev.download(&od).unwrap();
    for (g, &(r0, data, owned)) in spans.iter().enumerate() {
        let sample: Vec<usize> = sample_rows(data).into_iter().map(|r| r0 + r).collect();
        if !sample.is_empty() {
            check_close(&format!("{what} group {g}"), &gather(&out, n, &sample), &cpu_rows(&a_q, &a_s, k, &sample, w.get(g)));
        }
        let tail = &out[(r0 + data) * n..(r0 + owned) * n];
        assert!(tail.iter().all(|&x| x.to_bits() == 0), "{what} group {g}: rows past the count must be +0");
    }
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_sm90_fp8_gemm_grouped_contiguous() {
    let Some(dev) = gpu("cuda_sm90_fp8_gemm_grouped_contiguous") else { return };
    let mut rng = Rng(0x5eed_00c0);
    let weights: Vec<Weights> = [(4096, 7168), (7168, 2048)].iter().map(|&(n, k)| Weights::random(&mut rng, 6, n, k)).collect();
    let strat = (0usize..2, proptest::collection::vec(prop_oneof![Just(0u32), Just(64), Just(128), 1u32..300], 1..=6), 1u64..);
    runner(8)
        .run(&strat, |(s, sizes, seed)| {
            let mut rng = Rng(seed);
            let w = &weights[s];
            let mut offsets = vec![0u32];
            for z in &sizes {
                offsets.push(offsets.last().unwrap() + z);
            }
            let groups = sizes.len();
            let sub = Weights {
                n: w.n,
                k: w.k,
                data: w.data[..groups * w.n * w.k].to_vec(),
                scale_inv: w.scale_inv[..groups * w.n.div_ceil(128) * (w.k / 128)].to_vec(),
            };
            let rows = *offsets.last().unwrap() as usize;
            check_grouped(&dev, &sub, Sm90Layout::Contiguous { offsets: &offsets }, rows, &mut rng, &format!("contiguous {offsets:?}"));
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_sm90_fp8_gemm_grouped_masked() {
    let Some(dev) = gpu("cuda_sm90_fp8_gemm_grouped_masked") else { return };
    let mut rng = Rng(0x5eed_3a5c);
    let weights: Vec<Weights> = [(4096, 7168), (7168, 2048)].iter().map(|&(n, k)| Weights::random(&mut rng, 6, n, k)).collect();
    let strat =
        (0usize..2, prop_oneof![Just(32usize), Just(64), Just(100), Just(256)], proptest::collection::vec(0.0f64..=1.0, 1..=6), 1u64..);
    runner(8)
        .run(&strat, |(s, capacity, fill, seed)| {
            let mut rng = Rng(seed);
            let w = &weights[s];
            let counts: Vec<u32> = fill.iter().map(|f| (f * capacity as f64).round() as u32).collect();
            let groups = counts.len();
            let sub = Weights {
                n: w.n,
                k: w.k,
                data: w.data[..groups * w.n * w.k].to_vec(),
                scale_inv: w.scale_inv[..groups * w.n.div_ceil(128) * (w.k / 128)].to_vec(),
            };
            let layout = Sm90Layout::Masked { counts: &counts, capacity };
            check_grouped(&dev, &sub, layout, groups * capacity, &mut rng, &format!("masked cap {capacity} {counts:?}"));
            Ok(())
        })
        .unwrap();
}

/// Shapes without an instantiation take the simple kernel: bit-exact with the CPU reference.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_sm90_fp8_gemm_fallback() {
    let Some(dev) = gpu("cuda_sm90_fp8_gemm_fallback") else { return };
    let mut rng = Rng(0x5eed_fa11);
    // Two (N, K) without an instantiation (asserted: q_a_proj and kv_a_proj_with_mqa alone,
    // 1536 and 576 x 7168, were the examples here until the catalog gained them).
    for &(n, k, m) in &[(384usize, 7168usize, 5usize), (640, 7168, 130)] {
        assert!(!SM90_KERNELS.iter().any(|c| (c.n, c.k) == (n, k)), "{n}x{k} is in the catalog now: pick another shape");
        let w = Weights::random(&mut rng, 1, n, k);
        let (a_q, a_s) = (rng.codes(m * k), rng.scales(m * k / 128));
        let (qd, sd) = (dev.upload(&a_q).unwrap(), dev.upload(&a_s).unwrap());
        let wd = dev.upload_fp8_stack(&w.all()).unwrap();
        let mut od = dev.zeros::<f32>(m * n).unwrap();
        let route = dev.sm90_fp8_gemm(&qd, &sd, &wd, Sm90Layout::Dense { m }, Sm90Out::F32(&mut od)).unwrap();
        assert_eq!(route, Sm90Route::Fallback(Sm90Fallback::Shape));
        let mut cpu = vec![0f32; m * n];
        gemm::reference::gemm_fp8(&a_q, &a_s, w.get(0), GemmShape { m, n, k }, &mut cpu).unwrap();
        let out = dev.download(&od).unwrap();
        let i = out.iter().zip(&cpu).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(i.is_none(), "{n}x{k}: element {i:?} differs from the CPU reference");
        let mut bd = dev.zeros::<half::bf16>(m * n).unwrap();
        dev.sm90_fp8_gemm(&qd, &sd, &wd, Sm90Layout::Dense { m }, Sm90Out::Bf16(&mut bd)).unwrap();
        let b = dev.download(&bd).unwrap();
        assert!(cpu.iter().zip(&b).all(|(f, b)| half::bf16::from_f32(*f).to_bits() == b.to_bits()), "{n}x{k}: bf16 fallback");
    }
    // A masked layout of an unspecialised shape: per-group simple kernel, zeros past counts.
    let (n, k, cap) = (576usize, 1536usize, 40usize);
    assert!(!SM90_KERNELS.iter().any(|c| (c.n, c.k) == (n, k)), "{n}x{k} is in the catalog now: pick another shape");
    let counts = [40u32, 0, 13];
    let w = Weights::random(&mut rng, 3, n, k);
    let (mut a_q, a_s) = (rng.codes(3 * cap * k), rng.scales(3 * cap * k / 128));
    for (e, &c) in counts.iter().enumerate() {
        a_q[(e * cap + c as usize) * k..(e + 1) * cap * k].fill(0x7F);
    }
    let wd = dev.upload_fp8_stack(&w.all()).unwrap();
    let mut od = dev.upload(&vec![f32::NAN; 3 * cap * n]).unwrap();
    let layout = Sm90Layout::Masked { counts: &counts, capacity: cap };
    let route = dev.sm90_fp8_gemm(&dev.upload(&a_q).unwrap(), &dev.upload(&a_s).unwrap(), &wd, layout, Sm90Out::F32(&mut od)).unwrap();
    assert_eq!(route, Sm90Route::Fallback(Sm90Fallback::Shape));
    let out = dev.download(&od).unwrap();
    for (e, &c) in counts.iter().enumerate() {
        let c = c as usize;
        let mut cpu = vec![0f32; c * n];
        let r0 = e * cap;
        gemm::reference::gemm_fp8(
            &a_q[r0 * k..(r0 + c) * k],
            &a_s[r0 * k / 128..(r0 + c) * k / 128],
            w.get(e),
            GemmShape { m: c, n, k },
            &mut cpu,
        )
        .unwrap();
        assert!(out[r0 * n..(r0 + c) * n].iter().zip(&cpu).all(|(a, b)| a.to_bits() == b.to_bits()), "masked fallback group {e}");
        assert!(out[(r0 + c) * n..(r0 + cap) * n].iter().all(|&x| x.to_bits() == 0), "masked fallback group {e}: zeros");
    }
    // Shape errors come before any launch, with the CPU's error kinds.
    let mut small = dev.zeros::<f32>(3).unwrap();
    assert!(
        dev.sm90_fp8_gemm(
            &dev.zeros::<u8>(7168).unwrap(),
            &dev.zeros::<f32>(56).unwrap(),
            &wd,
            Sm90Layout::Dense { m: 1 },
            Sm90Out::F32(&mut small)
        )
        .is_err()
    );
}
