//! The CUDA backend's FP8 GEMMs through the `Backend` API, routed to the sm90 kernel where its
//! router has the shape (`sm90_gemm::gemm_route`).
//!
//! Host side (runs everywhere): the routing decision — every DeepSeek-V3 (N, K) of the sm90
//! table takes its TMA kernel on the fp8 path (block M by the largest group), other shapes,
//! experts that are not one consecutive run of one stack, and more than 256 experts take the
//! simple kernel, the Reference path always takes the dequantising one — and the default
//! `Backend::upload_weights`.
//!
//! GPU (ignored without one): `Backend::gemm` on every sm90 (N, K) at M from 1 to 600, a
//! weight that is a later entry of an expert stack, and `grouped_gemm_contiguous` /
//! `grouped_gemm_masked` on the V3 expert shapes with experts uploaded by
//! `Backend::upload_weights`, all against the CPU backend's fp8 path on the same f32 inputs:
//! DeepGEMM's calc_diff < 1e-3 per group, no NaN or inf, masked rows past the counts exactly
//! +0 (the output starts as NaN). Each case also runs through the device's `*_routed` form,
//! which must report the sm90 kernel (or the expected fallback) and give the same bits.
//! Large M is checked on sampled rows covering every 128-row block and both 64-row halves.

mod common;
mod cuda_common;

use cuda_common::{Rng, check_close, gpu};
use dsv3_kernels::cuda::DeviceFp8Weight;
use dsv3_kernels::cuda::sm90_gemm::{GemmRoute, SM90_KERNELS, Sm90Fallback, Sm90Layout, gemm_route};
use dsv3_kernels::fp8::calc_diff;
use dsv3_kernels::fp8::{Fp8Weight, Fp8WeightRef};
use dsv3_kernels::gemm::{GemmPath, GemmShape, V3_SHAPES};
use dsv3_kernels::{Backend, Cpu, Cuda};

/// The expert shapes (grouped GEMMs).
const EXPERT_SHAPES: &[(usize, usize)] = &[(4096, 7168), (2048, 7168), (7168, 2048)];

fn bm(rows: usize) -> usize {
    if rows <= 64 { 64 } else { 128 }
}

// ---------------------------------------------------------------------------------------------
// Host side (no GPU needed).
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_gemm_routes_v3_shapes_to_sm90() {
    for &(n, k) in V3_SHAPES {
        for m in [0, 1, 7, 64, 65, 128, 129, 600, 4096] {
            let dense = Sm90Layout::Dense { m };
            let r = gemm_route(GemmPath::Fp8, n, k, 1, dense, true).unwrap();
            let GemmRoute::Sm90(c) = r else { panic!("{n}x{k} m={m}: {r:?}") };
            assert_eq!((c.n, c.k, c.block_m), (n, k, bm(m)), "{n}x{k} m={m}");
            assert!(SM90_KERNELS.contains(&c));
            // The Reference path (f32 activations against the dequantised weight) has no
            // wgmma form: always the simple dequantising kernel.
            assert_eq!(gemm_route(GemmPath::Reference, n, k, 1, dense, true).unwrap(), GemmRoute::Dequant);
        }
    }
}

#[test]
fn backend_gemm_routes_other_shapes_to_the_simple_kernel() {
    // The backend harness's small shapes and a square one: no instantiation.
    for (n, k) in [(384, 256), (128, 256), (7168, 7168)] {
        for m in [1, 64, 4096] {
            let dense = Sm90Layout::Dense { m };
            assert_eq!(gemm_route(GemmPath::Fp8, n, k, 1, dense, true).unwrap(), GemmRoute::Fp8Simt(Sm90Fallback::Shape), "{n}x{k}");
            assert_eq!(gemm_route(GemmPath::Reference, n, k, 1, dense, true).unwrap(), GemmRoute::Dequant);
        }
    }
    // The Reference path takes any K; the fp8 path needs K % 128 == 0 (an error, as the CPU's).
    assert_eq!(gemm_route(GemmPath::Reference, 3, 100, 1, Sm90Layout::Dense { m: 2 }, true).unwrap(), GemmRoute::Dequant);
    assert!(gemm_route(GemmPath::Fp8, 4096, 7000, 1, Sm90Layout::Dense { m: 2 }, true).is_err());
}

#[test]
fn backend_grouped_gemm_routes() {
    let offsets = [0u32, 3, 3, 200, 264];
    let contiguous = Sm90Layout::Contiguous { offsets: &offsets };
    for &(n, k) in EXPERT_SHAPES {
        // Experts uploaded together (one stack, consecutive): the sm90 kernel, block M 128
        // (the largest group has 197 rows).
        let r = gemm_route(GemmPath::Fp8, n, k, 4, contiguous, true).unwrap();
        assert!(matches!(r, GemmRoute::Sm90(c) if (c.n, c.k, c.block_m) == (n, k, 128)), "{r:?}");
        // Experts uploaded one by one, repeated or out of order: the simple grouped kernel.
        assert_eq!(gemm_route(GemmPath::Fp8, n, k, 4, contiguous, false).unwrap(), GemmRoute::Fp8Simt(Sm90Fallback::Weights));
        assert_eq!(gemm_route(GemmPath::Reference, n, k, 4, contiguous, true).unwrap(), GemmRoute::Dequant);
        // Masked, no group over 64 rows: block M 64.
        let masked = Sm90Layout::Masked { counts: &[0, 64, 5], capacity: 64 };
        let r = gemm_route(GemmPath::Fp8, n, k, 3, masked, true).unwrap();
        assert!(matches!(r, GemmRoute::Sm90(c) if c.block_m == 64), "{r:?}");
        assert_eq!(gemm_route(GemmPath::Fp8, n, k, 3, masked, false).unwrap(), GemmRoute::Fp8Simt(Sm90Fallback::Weights));
        // DeepSeek-V3's 256 routed experts fit one launch; 257 do not.
        let counts = vec![3u32; 257];
        let r = gemm_route(GemmPath::Fp8, n, k, 256, Sm90Layout::Masked { counts: &counts[..256], capacity: 8 }, true).unwrap();
        assert!(matches!(r, GemmRoute::Sm90(_)), "{r:?}");
        let r = gemm_route(GemmPath::Fp8, n, k, 257, Sm90Layout::Masked { counts: &counts, capacity: 8 }, true).unwrap();
        assert_eq!(r, GemmRoute::Fp8Simt(Sm90Fallback::Groups));
    }
    // A shape without an instantiation says so, whatever the weights.
    assert_eq!(gemm_route(GemmPath::Fp8, 7168, 7168, 4, contiguous, false).unwrap(), GemmRoute::Fp8Simt(Sm90Fallback::Shape));
    // Bad layouts are errors on the fp8 path (the GEMMs check them, with the CPU's errors, first).
    assert!(gemm_route(GemmPath::Fp8, 4096, 7168, 3, contiguous, true).is_err(), "offsets length");
    assert!(gemm_route(GemmPath::Fp8, 4096, 7168, 2, Sm90Layout::Masked { counts: &[3, 9], capacity: 8 }, true).is_err());
}

/// The default `upload_weights` (the CPU backend's) is `upload_weight` on each, in order.
#[test]
fn backend_upload_weights_default_keeps_order() {
    let mut rng = Rng(7);
    let ws: Vec<Fp8Weight> = (0..3).map(|i| random_weight(&mut rng, 5 + i, 256)).collect();
    let views: Vec<Fp8WeightRef<'_>> = ws.iter().map(|w| w.view()).collect();
    let up = Cpu.upload_weights(&views).unwrap();
    assert_eq!(up, ws);
    assert!(Cpu.upload_weights(&[]).unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// GPU.
// ---------------------------------------------------------------------------------------------

/// A random valid FP8 weight (codes anywhere in e4m3, scales 2^-12 .. 2^-4).
fn random_weight(rng: &mut Rng, n: usize, k: usize) -> Fp8Weight {
    let scales = (0..n.div_ceil(128) * k.div_ceil(128)).map(|_| (2f32).powf(-12.0 + 8.0 * rng.unit())).collect();
    Fp8Weight::new(n, k, rng.codes(n * k), scales).unwrap()
}

/// Rows to check of an m-row output: all of them up to 300, else per 128-row block the first,
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

fn gather(x: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r * width..(r + 1) * width].iter().copied()).collect()
}

/// The CPU backend's fp8-path GEMM of rows `rows` of `a` (each row is quantised on its own, so
/// a subset of rows gives those rows' results).
fn cpu_rows(a: &[f32], k: usize, rows: &[usize], w: &Fp8Weight) -> Vec<f32> {
    let n = w.rows();
    let mut out = vec![0f32; rows.len() * n];
    Cpu.gemm(&gather(a, k, rows), w, GemmShape { m: rows.len(), n, k }, GemmPath::Fp8, &mut out).unwrap();
    out
}

fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let i = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
    assert!(i.is_none(), "{what}: element {i:?} differs between Backend and the routed call");
}

/// `Backend::gemm` on the fp8 path, checked against the CPU on sampled rows; then the same call
/// through `gemm_routed`, which must take `want` and give the same bits.
fn check_dense(cuda: &Cuda, w: &Fp8Weight, wd: &DeviceFp8Weight, m: usize, want: GemmRoute, rng: &mut Rng, what: &str) {
    let (n, k) = (w.rows(), w.cols());
    let s = GemmShape { m, n, k };
    let a = rng.acts(m, k);
    let ad = cuda.upload(&a).unwrap();
    let mut od = cuda.upload(&vec![f32::NAN; m * n]).unwrap();
    cuda.gemm(&ad, wd, s, GemmPath::Fp8, &mut od).unwrap();
    let out = cuda.download(&od).unwrap();
    let rows = sample_rows(m);
    check_close(&format!("{what} m={m}"), &gather(&out, n, &rows), &cpu_rows(&a, k, &rows, w));
    let mut od2 = cuda.zeros::<f32>(m * n).unwrap();
    let route = cuda.device().gemm_routed(&ad, wd, s, GemmPath::Fp8, &mut od2).unwrap();
    assert_eq!(route, want, "{what} m={m}");
    same_bits(&format!("{what} m={m}"), &out, &cuda.download(&od2).unwrap());
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_backend_fp8_gemm_v3_shapes_on_sm90() {
    let Some(_) = gpu("cuda_backend_fp8_gemm_v3_shapes_on_sm90") else { return };
    let cuda = Cuda::new(0).unwrap();
    let mut rng = Rng(0x5eed_0b0e);
    for &(n, k) in V3_SHAPES {
        let w = random_weight(&mut rng, n, k);
        let wd = cuda.upload_weight(w.view()).unwrap();
        assert_eq!(cuda.weight_shape(&wd), (n, k));
        for m in [1, 7, 64, 65, 129, 600] {
            let c = SM90_KERNELS.iter().find(|c| (c.n, c.k, c.block_m) == (n, k, bm(m))).unwrap();
            check_dense(&cuda, &w, &wd, m, GemmRoute::Sm90(*c), &mut rng, &format!("{n}x{k}"));
        }
        // The Reference path stays on the simple dequantising kernel.
        let (m, s) = (7, GemmShape { m: 7, n, k });
        let a = rng.acts(m, k);
        let mut od = cuda.zeros::<f32>(m * n).unwrap();
        let route = cuda.device().gemm_routed(&cuda.upload(&a).unwrap(), &wd, s, GemmPath::Reference, &mut od).unwrap();
        assert_eq!(route, GemmRoute::Dequant);
        let mut cpu = vec![0f32; m * n];
        Cpu.gemm(&a, &w, s, GemmPath::Reference, &mut cpu).unwrap();
        let d = calc_diff(&cuda.download(&od).unwrap(), &cpu);
        assert!(d < 1e-7, "{n}x{k} reference path: calc_diff = {d}");
    }
    // A weight that is a later entry of an expert stack (`upload_weights`): the sm90 kernel
    // reads it at its offset in the stack.
    for &(n, k) in EXPERT_SHAPES {
        let ws: Vec<Fp8Weight> = (0..3).map(|_| random_weight(&mut rng, n, k)).collect();
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let wds = cuda.upload_weights(&views).unwrap();
        assert_eq!((wds[2].index(), wds[2].stack().groups()), (2, 3));
        for m in [3, 130] {
            let c = SM90_KERNELS.iter().find(|c| (c.n, c.k, c.block_m) == (n, k, bm(m))).unwrap();
            check_dense(&cuda, &ws[2], &wds[2], m, GemmRoute::Sm90(*c), &mut rng, &format!("{n}x{k} entry 2"));
        }
    }
    // q_a_proj alone (1536 x 7168) has its own instantiations since the unfused projections
    // were added to the catalog: block M 64 at 9 rows.
    let w = random_weight(&mut rng, 1536, 7168);
    let wd = cuda.upload_weight(w.view()).unwrap();
    let c = SM90_KERNELS.iter().find(|c| (c.n, c.k, c.block_m) == (1536, 7168, 64)).unwrap();
    check_dense(&cuda, &w, &wd, 9, GemmRoute::Sm90(*c), &mut rng, "1536x7168");
    // A shape without an instantiation (asserted, so that a new catalog entry cannot make this
    // expectation stale again): the simple kernel.
    let (n, k) = (384, 7168);
    assert!(!SM90_KERNELS.iter().any(|c| (c.n, c.k) == (n, k)), "{n}x{k} is in the catalog now: pick another shape");
    let w = random_weight(&mut rng, n, k);
    let wd = cuda.upload_weight(w.view()).unwrap();
    check_dense(&cuda, &w, &wd, 9, GemmRoute::Fp8Simt(Sm90Fallback::Shape), &mut rng, "384x7168");
}

/// Per group, calc_diff of its live rows against the CPU, and (masked) +0 past the count.
/// `spans`: (first row, rows with data, rows owned).
fn check_groups(what: &str, n: usize, gpu: &[f32], cpu: &[f32], spans: &[(usize, usize, usize)]) {
    for (g, &(r0, data, owned)) in spans.iter().enumerate() {
        if data > 0 {
            check_close(&format!("{what} group {g}"), &gpu[r0 * n..(r0 + data) * n], &cpu[r0 * n..(r0 + data) * n]);
        }
        let tail = &gpu[(r0 + data) * n..(r0 + owned) * n];
        assert!(tail.iter().all(|&x| x.to_bits() == 0), "{what} group {g}: rows past the count must be +0");
    }
}

/// The experts of one shape on both backends: `n_experts` random weights, uploaded together
/// on the GPU (one stack) and one by one (separate stacks).
struct Experts {
    host: Vec<Fp8Weight>,
    stacked: Vec<DeviceFp8Weight>,
    single: Vec<DeviceFp8Weight>,
}
impl Experts {
    fn new(cuda: &Cuda, rng: &mut Rng, n_experts: usize, n: usize, k: usize) -> Experts {
        let host: Vec<Fp8Weight> = (0..n_experts).map(|_| random_weight(rng, n, k)).collect();
        let views: Vec<_> = host.iter().map(|w| w.view()).collect();
        let stacked = cuda.upload_weights(&views).unwrap();
        let single = views.iter().map(|v| cuda.upload_weight(*v).unwrap()).collect();
        Experts { host, stacked, single }
    }
}

/// Experts `sel` of `x`: host weights and the GPU weights of `dev` (stacked or single).
fn pick<'a>(x: &'a Experts, dev: &'a [DeviceFp8Weight], sel: &[usize]) -> (Vec<&'a Fp8Weight>, Vec<&'a DeviceFp8Weight>) {
    (sel.iter().map(|&e| &x.host[e]).collect(), sel.iter().map(|&e| &dev[e]).collect())
}

/// One grouped case: rows per group (contiguous sizes or masked counts), the experts used, in
/// order, whether the GPU holds them as one stack, and the block M of the sm90 kernel the call
/// must take (`None`: the simple kernel, for [`Sm90Fallback::Weights`]).
struct Case {
    rows: Vec<u32>,
    sel: Vec<usize>,
    stacked: bool,
    block_m: Option<usize>,
}
fn case(rows: &[u32], sel: &[usize], stacked: bool, block_m: Option<usize>) -> Case {
    Case { rows: rows.to_vec(), sel: sel.to_vec(), stacked, block_m }
}
impl Case {
    fn name(&self, n: usize, k: usize, layout: &str) -> String {
        let how = if self.stacked { "" } else { " (uploaded one by one)" };
        format!("{n}x{k} {layout} {:?} experts {:?}{how}", self.rows, self.sel)
    }
    fn check_route(&self, what: &str, n: usize, k: usize, route: GemmRoute) {
        match self.block_m {
            Some(b) => assert!(matches!(route, GemmRoute::Sm90(c) if (c.n, c.k, c.block_m) == (n, k, b)), "{what}: {route:?}"),
            None => assert_eq!(route, GemmRoute::Fp8Simt(Sm90Fallback::Weights), "{what}"),
        }
    }
}

const ALL6: &[usize] = &[0, 1, 2, 3, 4, 5];

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_backend_grouped_gemm_contiguous_on_sm90() {
    let Some(_) = gpu("cuda_backend_grouped_gemm_contiguous_on_sm90") else { return };
    let cuda = Cuda::new(0).unwrap();
    let mut rng = Rng(0x5eed_c0c0);
    for &(n, k) in EXPERT_SHAPES {
        let x = Experts::new(&cuda, &mut rng, 6, n, k);
        let cases = [
            case(&[0, 1, 64, 65, 129, 300], ALL6, true, Some(128)),
            case(&[5], &[0], true, Some(64)),
            case(&[17, 0, 64, 3], &[1, 2, 3, 4], true, Some(64)), // a run that starts at entry 1
            case(&[128, 0, 0, 17, 256, 2], ALL6, false, None),
            case(&[40, 7, 90], &[2, 1, 0], true, None), // one stack, out of order
        ];
        for c in cases {
            let what = c.name(n, k, "contiguous");
            let mut offsets = vec![0u32];
            for z in &c.rows {
                offsets.push(offsets.last().unwrap() + z);
            }
            let rows = *offsets.last().unwrap() as usize;
            let a = rng.acts(rows, k);
            let (hw, dw) = pick(&x, if c.stacked { &x.stacked } else { &x.single }, &c.sel);
            let mut cpu = vec![0f32; rows * n];
            Cpu.grouped_gemm_contiguous(&a, &offsets, &hw, GemmPath::Fp8, &mut cpu).unwrap();
            let (ad, od_off) = (cuda.upload(&a).unwrap(), cuda.upload(&offsets).unwrap());
            let mut od = cuda.upload(&vec![f32::NAN; rows * n]).unwrap();
            cuda.grouped_gemm_contiguous(&ad, &od_off, &dw, GemmPath::Fp8, &mut od).unwrap();
            let out = cuda.download(&od).unwrap();
            let spans: Vec<_> = offsets.windows(2).map(|p| (p[0] as usize, (p[1] - p[0]) as usize, (p[1] - p[0]) as usize)).collect();
            check_groups(&what, n, &out, &cpu, &spans);
            let mut od2 = cuda.zeros::<f32>(rows * n).unwrap();
            let route = cuda.device().grouped_contiguous_routed(&ad, &od_off, &dw, GemmPath::Fp8, &mut od2).unwrap();
            c.check_route(&what, n, k, route);
            same_bits(&what, &out, &cuda.download(&od2).unwrap());
        }
    }
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_backend_grouped_gemm_masked_on_sm90() {
    let Some(_) = gpu("cuda_backend_grouped_gemm_masked_on_sm90") else { return };
    let cuda = Cuda::new(0).unwrap();
    let mut rng = Rng(0x5eed_3a5c);
    for &(n, k) in EXPERT_SHAPES {
        let x = Experts::new(&cuda, &mut rng, 6, n, k);
        // (capacity, case).
        let cases = [
            (64, case(&[0, 1, 64, 33, 64, 7], ALL6, true, Some(64))),
            (100, case(&[100, 0, 3, 65], &[2, 3, 4, 5], true, Some(128))), // a run from entry 2
            (32, case(&[0, 0, 0], &[0, 1, 2], true, Some(64))),            // no live row: all zeros
            (256, case(&[256, 0, 19, 200, 1, 0], ALL6, true, Some(128))),
            (64, case(&[10, 64, 0, 2, 50, 64], ALL6, false, None)),
        ];
        for (cap, c) in cases {
            let what = c.name(n, k, &format!("masked cap {cap}"));
            let counts = &c.rows;
            let e = counts.len();
            // Rows past each count hold NaN: they must reach no output.
            let mut a = rng.acts(e * cap, k);
            for (g, &c) in counts.iter().enumerate() {
                a[(g * cap + c as usize) * k..(g + 1) * cap * k].fill(f32::NAN);
            }
            let (hw, dw) = pick(&x, if c.stacked { &x.stacked } else { &x.single }, &c.sel);
            let mut cpu = vec![0f32; e * cap * n];
            Cpu.grouped_gemm_masked(&a, counts, cap, &hw, GemmPath::Fp8, &mut cpu).unwrap();
            let (ad, cd) = (cuda.upload(&a).unwrap(), cuda.upload(counts).unwrap());
            let mut od = cuda.upload(&vec![f32::NAN; e * cap * n]).unwrap();
            cuda.grouped_gemm_masked(&ad, &cd, cap, &dw, GemmPath::Fp8, &mut od).unwrap();
            let out = cuda.download(&od).unwrap();
            let spans: Vec<_> = counts.iter().enumerate().map(|(g, &c)| (g * cap, c as usize, cap)).collect();
            check_groups(&what, n, &out, &cpu, &spans);
            let mut od2 = cuda.upload(&vec![f32::NAN; e * cap * n]).unwrap();
            let route = cuda.device().grouped_masked_routed(&ad, &cd, cap, &dw, GemmPath::Fp8, &mut od2).unwrap();
            c.check_route(&what, n, k, route);
            same_bits(&what, &out, &cuda.download(&od2).unwrap());
        }
    }
}
