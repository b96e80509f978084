//! The memory-bound kernels on the GPU against their CPU functions: act_quant (bit-exact),
//! RMSNorm (within the summation error; exact on small integers), SiLU·up (bit-exact with the
//! fast CPU version), embedding (exact), RoPE (bit-exact). Real V3 widths and edge sizes,
//! bounded case counts; bad input gives the CPU's error.

mod common;
mod cuda_common;

use common::*;
use cuda_common::{gpu, runner, same_bits};
use dsv3_kernels::embed::{self, EmbedShape};
use dsv3_kernels::fp8::{self, ActQuantShape, ScaleFmt};
use dsv3_kernels::norm::{self, RowsShape};
use dsv3_kernels::rope::{self, RopeCfg, RopeLayout, RopeTable};
use dsv3_kernels::{KernelError, act};
use half::bf16;
use proptest::prelude::*;

const U: f32 = f32::EPSILON / 2.0;

fn rows_cols(widths: &'static [usize]) -> impl Strategy<Value = (usize, usize)> {
    (prop_oneof![Just(0usize), Just(1usize), 2usize..=9], proptest::sample::select(widths))
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_act_quant_1x128_matches_cpu() {
    let Some(dev) = gpu("cuda_act_quant_1x128_matches_cpu") else { return };
    let strat = (rows_cols(&[128, 256, 512, 1536, 2048, 7168, 18432]), any::<bool>(), 0.001f32..1000.0)
        .prop_flat_map(|((r, c), ue8m0, range)| (Just(r), Just(c), Just(ue8m0), vec_f32(r * c, range)));
    runner(32)
        .run(&strat, |(rows, cols, ue8m0, x)| {
            let (shape, fmt) = (ActQuantShape { rows, cols }, if ue8m0 { ScaleFmt::Ue8m0 } else { ScaleFmt::Float });
            let (mut q, mut s) = (vec![0u8; rows * cols], vec![0f32; rows * cols / 128]);
            fp8::reference::act_quant(&x, shape, fmt, &mut q, &mut s).unwrap();
            let xd = dev.upload(&x).unwrap();
            let (mut qd, mut sd) = (dev.zeros::<u8>(q.len()).unwrap(), dev.zeros::<f32>(s.len()).unwrap());
            dev.act_quant_1x128(&xd, shape, fmt, &mut qd, &mut sd).unwrap();
            prop_assert_eq!(dev.download(&qd).unwrap(), q);
            same_bits("scales", &dev.download(&sd).unwrap(), &s)
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_act_quant_1x128_bad_input_matches_cpu() {
    let Some(dev) = gpu("cuda_act_quant_1x128_bad_input_matches_cpu") else { return };
    let shape = ActQuantShape { rows: 3, cols: 7168 };
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 3 * 7168];
        x[7168 + 300] = bad;
        x[2 * 7168 + 5] = bad;
        let (mut q, mut s) = (vec![0u8; x.len()], vec![0f32; 3 * 56]);
        let cpu = fp8::act_quant(&x, shape, ScaleFmt::Float, &mut q, &mut s).unwrap_err();
        let (mut qd, mut sd) = (dev.zeros::<u8>(q.len()).unwrap(), dev.zeros::<f32>(s.len()).unwrap());
        let g = dev.act_quant_1x128(&dev.upload(&x).unwrap(), shape, ScaleFmt::Float, &mut qd, &mut sd).unwrap_err();
        assert_eq!(g, cpu);
    }
    // Shape errors before any launch, as the CPU's.
    let (x, mut qd, mut sd) = (dev.zeros::<f32>(100).unwrap(), dev.zeros::<u8>(100).unwrap(), dev.zeros::<f32>(1).unwrap());
    let e = dev.act_quant_1x128(&x, ActQuantShape { rows: 1, cols: 100 }, ScaleFmt::Float, &mut qd, &mut sd).unwrap_err();
    assert!(matches!(e, KernelError::Shape { .. }), "{e}");
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_rms_norm_matches_cpu() {
    let Some(dev) = gpu("cuda_rms_norm_matches_cpu") else { return };
    let strat = rows_cols(&[1, 7, 127, 128, 129, 512, 1536, 7168])
        .prop_flat_map(|(r, c)| (Just(r), Just(c), vec_f32(r * c, 10.0), vec_f32(r * c, 10.0), vec_f32(c, 2.0)));
    runner(32)
        .run(&strat, |(rows, cols, x, res, w)| {
            let s = RowsShape { rows, cols };
            let tol = ((cols as f32 / 16.0 + 5.0) / 2.0 + 6.0) * U;
            let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
            let mut od = dev.zeros::<f32>(x.len()).unwrap();
            let mut cpu = vec![0f32; x.len()];
            norm::reference::rms_norm(&x, &w, s, 1e-6, &mut cpu).unwrap();
            dev.rms_norm(&xd, &wd, s, 1e-6, &mut od).unwrap();
            for (a, b) in dev.download(&od).unwrap().iter().zip(&cpu) {
                prop_assert!((a - b).abs() <= tol * b.abs(), "rms_norm: gpu {} cpu {}", a, b);
            }
            let (mut rc, mut rd) = (res.clone(), dev.upload(&res).unwrap());
            norm::reference::add_rms_norm(&x, &mut rc, &w, s, 1e-6, &mut cpu).unwrap();
            dev.add_rms_norm(&xd, &mut rd, &wd, s, 1e-6, &mut od).unwrap();
            same_bits("residual", &dev.download(&rd).unwrap(), &rc)?;
            for (a, b) in dev.download(&od).unwrap().iter().zip(&cpu) {
                prop_assert!((a - b).abs() <= tol * b.abs(), "add_rms_norm: gpu {} cpu {}", a, b);
            }
            Ok(())
        })
        .unwrap();
    // Small integers: every sum is exact, so GPU and reference agree bit for bit.
    let (r, c) = (3, 7168);
    let x: Vec<f32> = (0..r * c).map(|i| ((i * 7919) % 9) as f32 - 4.0).collect();
    let w: Vec<f32> = (0..c).map(|i| ((i * 31) % 9) as f32 - 4.0).collect();
    let (mut cpu, mut od) = (vec![0f32; r * c], dev.zeros::<f32>(r * c).unwrap());
    norm::reference::rms_norm(&x, &w, RowsShape { rows: r, cols: c }, 1e-6, &mut cpu).unwrap();
    dev.rms_norm(&dev.upload(&x).unwrap(), &dev.upload(&w).unwrap(), RowsShape { rows: r, cols: c }, 1e-6, &mut od).unwrap();
    same_bits("rms_norm on small integers", &dev.download(&od).unwrap(), &cpu).unwrap();
    // NaN propagates as on the CPU; a bad eps is the CPU's error.
    let mut xn = x.clone();
    xn[c + 3] = f32::NAN;
    dev.rms_norm(&dev.upload(&xn).unwrap(), &dev.upload(&w).unwrap(), RowsShape { rows: r, cols: c }, 1e-6, &mut od).unwrap();
    let got = dev.download(&od).unwrap();
    assert!(got[c..2 * c].iter().all(|v| v.is_nan()) && got[..c].iter().all(|v| !v.is_nan()));
    let e = dev.rms_norm(&dev.upload(&x).unwrap(), &dev.upload(&w).unwrap(), RowsShape { rows: r, cols: c }, f32::NAN, &mut od);
    let cpu_e = norm::rms_norm(&x, &w, RowsShape { rows: r, cols: c }, f32::NAN, &mut cpu);
    assert_eq!(e.unwrap_err(), cpu_e.unwrap_err());
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_silu_mul_matches_cpu() {
    let Some(dev) = gpu("cuda_silu_mul_matches_cpu") else { return };
    let strat = rows_cols(&[1, 7, 129, 2048, 18432]).prop_flat_map(|(r, c)| (Just(r), Just(c), vec_f32(2 * r * c, 30.0)));
    runner(32)
        .run(&strat, |(rows, cols, mut gu)| {
            if let Some(v) = gu.first_mut() {
                *v = f32::NAN;
            }
            if gu.len() > 2 {
                gu[1] = f32::NEG_INFINITY;
                gu[2] = -100.0;
            }
            let s = RowsShape { rows, cols };
            let (g, u) = gu.split_at(rows * cols);
            let mut cpu = vec![0f32; rows * cols];
            act::silu_mul(g, u, s, &mut cpu).unwrap();
            let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
            dev.silu_mul(&dev.upload(g).unwrap(), &dev.upload(u).unwrap(), s, &mut od).unwrap();
            same_bits("silu_mul", &dev.download(&od).unwrap(), &cpu)?;
            act::silu_mul_packed(&gu, s, &mut cpu).unwrap();
            dev.silu_mul_packed(&dev.upload(&gu).unwrap(), s, &mut od).unwrap();
            same_bits("silu_mul_packed", &dev.download(&od).unwrap(), &cpu)
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_embedding_bf16_matches_cpu() {
    let Some(dev) = gpu("cuda_embedding_bf16_matches_cpu") else { return };
    let strat = (1usize..=300, proptest::sample::select(&[1usize, 7, 128, 129, 7168][..]), 0usize..=20)
        .prop_flat_map(|(v, d, t)| (Just(v), Just(d), vec_f32(v * d, 50.0), proptest::collection::vec(0..v as u32, t)));
    runner(24)
        .run(&strat, |(vocab, dim, t, ids)| {
            let table: Vec<bf16> = t.iter().map(|&v| bf16::from_f32(v)).collect();
            let shape = EmbedShape { vocab, dim };
            let mut cpu = vec![0f32; ids.len() * dim];
            embed::reference::embedding(&table, shape, &ids, &mut cpu).unwrap();
            let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
            let (td, idd) = (dev.upload(&table).unwrap(), dev.upload(&ids).unwrap());
            dev.embedding(&td, shape, &idd, &mut od).unwrap();
            same_bits("embedding", &dev.download(&od).unwrap(), &cpu)?;
            // An id past the vocabulary: the CPU's error, first bad position.
            let mut bad = ids.clone();
            bad.extend([vocab as u32 + 3, 1, vocab as u32]);
            let mut out = vec![0f32; bad.len() * dim];
            let cpu_e = embed::embedding(&table, shape, &bad, &mut out).unwrap_err();
            let mut od = dev.zeros::<f32>(out.len()).unwrap();
            prop_assert_eq!(dev.embedding(&td, shape, &dev.upload(&bad).unwrap(), &mut od).unwrap_err(), cpu_e);
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_rope_matches_cpu() {
    let Some(dev) = gpu("cuda_rope_matches_cpu") else { return };
    let table = RopeTable::new(&RopeCfg::DEEPSEEK_V3, 5000).unwrap();
    let td = dev.rope_table(&table).unwrap();
    let strat = (0usize..=9, 0usize..3).prop_flat_map(|(t, which)| {
        let lay = match which {
            0 => RopeLayout::q_pe(t, 128, 128, 64),
            1 => RopeLayout::k_pe(t, 512, 64),
            _ => RopeLayout::contiguous(t, 3, 64),
        };
        (Just(lay), vec_f32(t * lay.row_stride, 4.0), proptest::collection::vec(0u32..5000, t))
    });
    runner(24)
        .run(&strat, |(lay, x, pos)| {
            let mut cpu = x.clone();
            rope::apply_rope(&mut cpu, lay, &pos, &table).unwrap();
            let (mut xd, pd) = (dev.upload(&x).unwrap(), dev.upload(&pos).unwrap());
            dev.apply_rope(&mut xd, lay, &pd, &td).unwrap();
            same_bits("rope", &dev.download(&xd).unwrap(), &cpu)?;
            if lay.tokens > 0 {
                let mut bad = pos.clone();
                bad[lay.tokens - 1] = 5000;
                let cpu_e = rope::apply_rope(&mut x.clone(), lay, &bad, &table).unwrap_err();
                prop_assert_eq!(dev.apply_rope(&mut xd, lay, &dev.upload(&bad).unwrap(), &td).unwrap_err(), cpu_e);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_softmax_matches_cpu() {
    let Some(dev) = gpu("cuda_softmax_matches_cpu") else { return };
    // Widths around the 16 lanes and the block, attention-sized rows and V3's vocabulary.
    let strat = (
        prop_oneof![Just(0usize), Just(1usize), 2usize..=6],
        proptest::sample::select(&[1usize, 7, 15, 16, 17, 255, 257, 4096, 129_280][..]),
    )
        .prop_flat_map(|(r, c)| (Just(r), Just(c), vec_f32(r * c, 40.0), 0u8..4));
    runner(32)
        .run(&strat, |(rows, cols, mut x, special)| {
            // Row 0 special: all -inf (uniform), some -inf entries, a NaN, or NaN among -inf.
            if rows > 0 {
                let r0 = &mut x[..cols];
                match special {
                    0 => r0.fill(f32::NEG_INFINITY),
                    1 => r0.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY),
                    2 => r0[cols / 2] = f32::NAN,
                    _ => {
                        r0.fill(f32::NEG_INFINITY);
                        r0[cols - 1] = f32::NAN;
                    }
                }
            }
            let s = RowsShape { rows, cols };
            let mut cpu = vec![0f32; x.len()];
            act::softmax(&x, s, &mut cpu).unwrap();
            let mut od = dev.zeros::<f32>(x.len()).unwrap();
            dev.softmax(&dev.upload(&x).unwrap(), s, &mut od).unwrap();
            same_bits("softmax", &dev.download(&od).unwrap(), &cpu)
        })
        .unwrap();
    // Shape errors are the CPU's.
    let mut od = dev.zeros::<f32>(4).unwrap();
    let e = dev.softmax(&dev.zeros::<f32>(4).unwrap(), RowsShape { rows: 1, cols: 0 }, &mut od).unwrap_err();
    assert_eq!(e, act::softmax(&[0.0; 4], RowsShape { rows: 1, cols: 0 }, &mut [0.0; 4]).unwrap_err());
    let e = dev.softmax(&dev.zeros::<f32>(4).unwrap(), RowsShape { rows: 1, cols: 3 }, &mut od).unwrap_err();
    assert_eq!(e, act::softmax(&[0.0; 4], RowsShape { rows: 1, cols: 3 }, &mut [0.0; 4]).unwrap_err());
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_add_assign_matches_cpu() {
    let Some(dev) = gpu("cuda_add_assign_matches_cpu") else { return };
    use dsv3_kernels::{Backend, Cpu};
    let strat =
        proptest::sample::select(&[0usize, 1, 255, 257, 7168, 3 * 7168 + 5][..]).prop_flat_map(|n| (vec_f32(n, 1e3), vec_f32(n, 1e3)));
    runner(16)
        .run(&strat, |(mut acc, x)| {
            if acc.len() > 2 {
                acc[0] = f32::NAN;
                acc[1] = f32::INFINITY;
            }
            let mut ad = dev.upload(&acc).unwrap();
            dev.add_assign(&mut ad, &dev.upload(&x).unwrap()).unwrap();
            Cpu.add_assign(&mut acc, &x).unwrap();
            same_bits("add_assign", &dev.download(&ad).unwrap(), &acc)
        })
        .unwrap();
    let mut ad = dev.zeros::<f32>(3).unwrap();
    let e = dev.add_assign(&mut ad, &dev.zeros::<f32>(4).unwrap()).unwrap_err();
    assert_eq!(e, Cpu.add_assign(&mut vec![0f32; 3], &vec![0f32; 4]).unwrap_err());
}
