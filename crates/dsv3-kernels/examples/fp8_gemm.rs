//! The FP8 GEMM three ways on the CPU: against the exactly dequantised weight (the reference
//! path), with the activation quantised per 1x128 tile (the fp8 path), and on an activation
//! quantised beforehand with power-of-two (ue8m0) scales, through the `Backend` trait.
//!
//! `cargo run --release -p dsv3-kernels --example fp8_gemm`

use dsv3_kernels::prelude::*;
use std::time::Instant;

fn main() -> Result<()> {
    // DeepSeek-V3's q_a_proj at decode: [1536, 7168] against 4 tokens.
    let (m, n, k) = (4, 1536, 7168);
    let w_f32: Vec<f32> = (0..n * k).map(|i| (((i as u64 * 2_654_435_761) % 2001) as f32 - 1000.0) / 40_000.0).collect();
    let w = Fp8Weight::quantize(n, k, &w_f32)?;
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
    let shape = GemmShape { m, n, k };

    let mut exact = vec![0f32; m * n];
    let t = Instant::now();
    gemm(&a, w.view(), shape, GemmPath::Reference, &mut exact)?;
    println!("reference path: {:?}", t.elapsed());

    let mut fp8 = vec![0f32; m * n];
    let t = Instant::now();
    gemm(&a, w.view(), shape, GemmPath::Fp8, &mut fp8)?;
    println!("fp8 path:       {:?}, calc_diff vs reference {:.2e}", t.elapsed(), calc_diff(&exact, &fp8));

    // Quantise once (ue8m0 scales, as V3.1 checkpoints ask), then multiply on a backend.
    let b = Cpu;
    let qs = ActQuantShape { rows: m, cols: k };
    let (mut q, mut s) = (b.zeros::<u8>(m * k)?, b.zeros::<f32>(m * qs.tiles())?);
    b.act_quant(&b.upload(&a)?, qs, ScaleFmt::Ue8m0, &mut q, &mut s)?;
    let mut out = b.zeros::<f32>(m * n)?;
    b.gemm_quantized(&q, &s, &b.upload_weight(w.view())?, shape, &mut out)?;
    println!("ue8m0 scales:   calc_diff vs reference {:.2e}", calc_diff(&exact, &b.download(&out)?));
    Ok(())
}
