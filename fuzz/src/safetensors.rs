//! A safetensors file: the 8-byte header length, the JSON header, the tensor table.
//!
//! Invariants beyond "typed error or value": every accepted tensor lies inside the file after
//! the header and its length is its shape times its dtype size; the reference `safetensors`
//! crate accepts the file too and sees the same tensors at the same bytes; the file opened
//! from disk ([`Checkpoint::open`], memory-mapped) gives the same bytes, and the typed
//! accessors (FP8 + scale, BF16, norm, F32 vector) answer with a value or a typed error.

use dsv3_runtime::checkpoint::{Checkpoint, Progress, SINGLE_FILE};
use dsv3_runtime::tensor_file::{Dtype, TensorInfo, parse_bytes};
use std::collections::BTreeMap;
use std::path::Path;

pub fn run(data: &[u8]) {
    let tensors = match parse_bytes(Path::new(SINGLE_FILE), data) {
        Ok((tensors, _metadata)) => tensors,
        Err(e) => return crate::typed_error(e),
    };
    let header_end = 8 + u64::from_le_bytes(data[..8].try_into().expect("accepted files have 8 length bytes"));
    for (name, t) in &tensors {
        let end = t.offset.checked_add(t.len as u64).expect("offset + len overflows");
        assert!(t.offset >= header_end && end <= data.len() as u64, "tensor `{name}` at {}..{end} is outside the data section", t.offset);
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).expect("accepted shape overflows");
        assert_eq!(numel * t.dtype.size(), t.len, "tensor `{name}`: shape {:?} does not match its byte length", t.shape);
    }
    agrees_with_reference(data, &tensors);
    through_a_file(data, &tensors);
}

/// The reference implementation must accept what dsv3 accepts, with the same table.
fn agrees_with_reference(data: &[u8], tensors: &BTreeMap<String, TensorInfo>) {
    let st = safetensors::SafeTensors::deserialize(data)
        .unwrap_or_else(|e| panic!("dsv3 accepts a file that the safetensors crate refuses: {e:?}"));
    assert_eq!(st.len(), tensors.len(), "tensor count differs from the safetensors crate");
    for (name, t) in tensors {
        let view = st.tensor(name).unwrap_or_else(|e| panic!("tensor `{name}` unknown to the safetensors crate: {e:?}"));
        assert_eq!(view.shape(), t.shape.as_slice(), "tensor `{name}`: shape differs from the safetensors crate");
        let ours = &data[t.offset as usize..t.offset as usize + t.len];
        assert_eq!(view.data(), ours, "tensor `{name}`: bytes differ from the safetensors crate");
    }
}

/// Opens the bytes as a one-file model directory and reads every tensor back.
fn through_a_file(data: &[u8], tensors: &BTreeMap<String, TensorInfo>) {
    let dir = crate::scratch("safetensors");
    let file = dir.join(SINGLE_FILE);
    let _ = std::fs::remove_file(&file);
    std::fs::write(&file, data).expect("write the scratch file");
    let ck = Checkpoint::open_with(&dir, Progress::Never).unwrap_or_else(|e| panic!("parse_bytes accepts what open refuses: {e}"));
    assert_eq!(ck.len(), tensors.len());
    for (name, t) in tensors {
        let (_, info) = ck.info(name).expect("an accepted tensor is in the checkpoint");
        assert_eq!(info, t, "tensor `{name}`: the opened file's table differs from parse_bytes");
        let _ = match (t.dtype, t.shape.as_slice()) {
            (Dtype::F8E4M3 | Dtype::Bf16, &[rows, cols]) => ck.linear_weight(name, rows, cols).map(drop),
            (Dtype::Bf16, &[len]) => ck.norm_weight(name, len).map(drop),
            (Dtype::F32, &[len]) => ck.f32_vec(name, len).and_then(|_| ck.norm_weight(name, len)).map(drop),
            _ => Ok(()),
        }
        .map_err(crate::typed_error);
    }
}
