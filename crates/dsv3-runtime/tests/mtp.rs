//! Multi-token prediction and speculative decoding.

mod common;

use common::load_model;
use dsv3_kernels::{Backend, Cpu};
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::model::{AttnForm, Model};
use dsv3_runtime::{InitOptions, Preset, init_random_preset};

fn random_model(preset: Preset) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    init_random_preset(preset, &tmp.path().join("m"), &InitOptions { seed: 7, ..Default::default() }).unwrap();
    tmp
}

/// Hidden rows, logits and every cache row after `prompt` then `steps` (each a forward call).
fn run(m: &Model<Cpu>, prompt: &[u32], steps: &[&[u32]], form: AttnForm) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let mut cache = m.new_cache(&Cpu, 64).unwrap();
    let seq = cache.add_sequence();
    m.forward_hidden(&Cpu, &mut cache, &[(seq, prompt)]).unwrap();
    let (mut hidden, mut logits) = (Vec::new(), Vec::new());
    for s in steps {
        let h = m.forward_hidden_with(&Cpu, &mut cache, &[(seq, s)], form).unwrap();
        hidden.extend(Cpu.download(&h).unwrap());
        logits.extend(m.logits(&Cpu, &h, &(0..s.len()).collect::<Vec<_>>()).unwrap());
    }
    let rows = (0..m.config().num_hidden_layers).map(|l| cache.read_rows(&Cpu, l, seq).unwrap()).collect();
    (hidden, logits, rows)
}

/// The verification step of speculative decoding runs [next, draft] in one absorbed step; its
/// rows must be bit-identical to two one-token decode steps, or greedy output with MTP could
/// differ from greedy output without it.
#[test]
fn a_two_token_absorbed_step_equals_two_decode_steps_bit_for_bit() {
    for (preset, paths) in
        [(Preset::Tiny, &[GemmPath::Reference, GemmPath::Fp8][..]), (Preset::TinyV2Lite, &[GemmPath::Reference][..])]
    {
        let tmp = random_model(preset);
        for &path in paths {
            let m = load_model(&tmp.path().join("m"), path);
            let prompt = [5u32, 77, 300, 12, 9];
            let one = run(&m, &prompt, &[&[41], &[600], &[7]], AttnForm::Auto);
            let two = run(&m, &prompt, &[&[41, 600], &[7]], AttnForm::Absorbed);
            assert!(one.0 == two.0, "{preset:?} {path:?}: hidden states differ");
            assert!(one.1 == two.1, "{preset:?} {path:?}: logits differ");
            assert!(one.2 == two.2, "{preset:?} {path:?}: cache rows differ");
        }
    }
}
