//! The read-only map and the storage behind weights: in-place ranges equal the file's bytes,
//! misaligned or out-of-range requests fall back or fail cleanly, a shrunk file is a typed
//! error, the CPU backend keeps mapped weights without copying, and dropping the last handle
//! of a range releases its pages while another handle still reads the same bytes.

use dsv3_kernels::backend::{Backend, Cpu};
use dsv3_kernels::bf16_gemm::Bf16Weight;
use dsv3_kernels::fp8::{Fp8Weight, encode_e4m3};
use dsv3_kernels::mmap::{MapError, MappedFile, Storage};
use half::bf16;
use std::io::Write;
use std::sync::Arc;

/// A temp file holding `bytes`, mapped.
fn mapped(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<MappedFile>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    let m = Arc::new(MappedFile::open(f.path()).unwrap());
    (f, m)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn map_reads_the_file_bytes() {
    let bytes = pattern(100_003);
    let (_f, m) = mapped(&bytes);
    assert_eq!(m.len(), bytes.len());
    assert_eq!(m.bytes(), &bytes[..]);
    // Bytes at any offset are read in place.
    let s = Storage::<u8>::map_le(&m, 3, 1000).unwrap();
    assert!(s.is_mapped());
    assert_eq!(&s[..], &bytes[3..1003]);
    let (file, range) = s.mapped_range().unwrap();
    assert!(Arc::ptr_eq(file, &m));
    assert_eq!(range, 3..1003);
    assert_eq!(s.clone().into_vec(), bytes[3..1003].to_vec());
    m.check_len().unwrap();
}

#[test]
fn bf16_in_place_when_aligned_copy_when_not() {
    let vals: Vec<bf16> = (0..4099).map(|i| bf16::from_f32(i as f32 * 0.25 - 100.0)).collect();
    let le: Vec<u8> = vals.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
    for lead in [0usize, 1, 2, 3] {
        let mut bytes = vec![0xAAu8; lead];
        bytes.extend_from_slice(&le);
        let (_f, m) = mapped(&bytes);
        let s = Storage::<bf16>::map_le(&m, lead, le.len()).unwrap();
        assert_eq!(&s[..], &vals[..], "lead {lead}");
        // The map starts on a page, so alignment is the offset's.
        assert_eq!(s.is_mapped(), cfg!(target_endian = "little") && lead % 2 == 0, "lead {lead}");
        let mapped_here = s.is_mapped();
        let w = Bf16Weight::from_storage(1, 4099, s).unwrap();
        assert_eq!(w.is_mapped(), mapped_here);
        assert_eq!(w, Bf16Weight::new(1, 4099, vals.clone()).unwrap());
    }
}

#[test]
fn f32_alignment_fallback_converts_every_element() {
    let vals: Vec<f32> = (0..1000).map(|i| (i as f32).sin() * 1e3).collect();
    let le: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut bytes = vec![0u8; 6];
    bytes.extend_from_slice(&le);
    let (_f, m) = mapped(&bytes);
    let s = Storage::<f32>::map_le(&m, 6, le.len()).unwrap();
    assert!(!s.is_mapped());
    assert_eq!(&s[..], &vals[..]);
}

#[test]
fn bad_ranges_are_typed_errors() {
    let (f, m) = mapped(&pattern(64));
    for (start, len) in [(0, 65), (60, 5), (65, 0), (usize::MAX, 2)] {
        match Storage::<u8>::map_le(&m, start, len) {
            Err(MapError::Range { path, detail }) => {
                assert_eq!(path, f.path());
                assert!(detail.contains("outside the 64-byte map"), "{detail}");
            }
            other => panic!("{start}+{len}: {other:?}"),
        }
    }
    let e = Storage::<bf16>::map_le(&m, 0, 3).unwrap_err();
    assert!(e.to_string().contains("not a whole number of 2-byte elements"), "{e}");
    assert_eq!(e.path(), f.path());
    let empty = Storage::<f32>::map_le(&m, 1, 0).unwrap();
    assert!(empty.is_empty() && !empty.is_mapped());
    let missing = MappedFile::open(&f.path().with_extension("missing")).unwrap_err();
    assert!(matches!(missing, MapError::Io { op: "open", .. }), "{missing:?}");
}

#[test]
fn shrunk_file_is_a_typed_error_not_a_crash() {
    let (f, m) = mapped(&pattern(1 << 20));
    let s = Storage::<u8>::map_le(&m, 0, 1 << 20).unwrap();
    assert_eq!(s[12345], pattern(1 << 20)[12345]);
    f.as_file().set_len(1000).unwrap();
    match m.check_len() {
        Err(MapError::Shrunk { mapped, now, .. }) => assert_eq!((mapped, now), (1 << 20, 1000)),
        other => panic!("{other:?}"),
    }
    // Dropping handles of the lost range must not touch it.
    drop(s);
    drop(m);
}

fn fp8_weight_bytes(rows: usize, cols: usize) -> Vec<u8> {
    (0..rows * cols).map(|i| encode_e4m3(((i % 97) as f32 - 48.0) / 8.0)).collect()
}

#[test]
fn cpu_backend_keeps_mapped_weights_in_place() {
    let (rows, cols) = (130, 300);
    let codes = fp8_weight_bytes(rows, cols);
    let mut bytes = vec![7u8; 5];
    bytes.extend_from_slice(&codes);
    let (_f, m) = mapped(&bytes);
    let scales = vec![0.5f32; 2 * 3];
    let w = Fp8Weight::from_storage(rows, cols, Storage::map_le(&m, 5, codes.len()).unwrap(), scales.clone()).unwrap();
    assert!(w.is_mapped());
    // Equal to the same weight read into a Vec.
    let owned = Fp8Weight::new(rows, cols, codes.clone(), scales.clone()).unwrap();
    assert_eq!(w, owned);
    assert_eq!(w.view().dequantize(), owned.view().dequantize());

    // Upload of the view of a mapped weight shares the map; so does taking it by value.
    let up = Cpu.upload_weight(w.view()).unwrap();
    assert!(up.is_mapped());
    assert_eq!(up.view().data().as_ptr(), w.view().data().as_ptr());
    let ptr = w.view().data().as_ptr();
    let taken = Cpu.upload_weight_owned(w).unwrap();
    assert_eq!(taken.view().data().as_ptr(), ptr);
    // An owned weight's view is copied, a bare view too; by value it is moved.
    let copied = Cpu.upload_weight(owned.view()).unwrap();
    assert_ne!(copied.view().data().as_ptr(), owned.view().data().as_ptr());
    assert_eq!(copied, owned);
    let bare = dsv3_kernels::fp8::Fp8WeightRef::new(rows, cols, &codes, &scales).unwrap();
    assert!(bare.source().is_none());
    assert_eq!(Cpu.upload_weight(bare).unwrap(), owned);
    let optr = owned.view().data().as_ptr();
    assert_eq!(Cpu.upload_weight_owned(owned).unwrap().view().data().as_ptr(), optr);

    // bf16: the same, in place at an even offset.
    let vals: Vec<bf16> = (0..rows * cols).map(|i| bf16::from_f32(i as f32 / 64.0)).collect();
    let mut bytes = vec![1u8; 4];
    bytes.extend(vals.iter().flat_map(|v| v.to_bits().to_le_bytes()));
    let (_g, m2) = mapped(&bytes);
    let d = Bf16Weight::from_storage(rows, cols, Storage::map_le(&m2, 4, 2 * vals.len()).unwrap()).unwrap();
    assert_eq!(d.is_mapped(), cfg!(target_endian = "little"));
    assert_eq!(d, Bf16Weight::new(rows, cols, vals.clone()).unwrap());
    let up = Cpu.upload_dense_weight(d.view()).unwrap();
    assert_eq!(up.view().data().as_ptr(), d.view().data().as_ptr());
    let dptr = d.view().data().as_ptr();
    assert_eq!(Cpu.upload_dense_weight_owned(d).unwrap().view().data().as_ptr(), dptr);
    // Validation still applies to mapped codes: a NaN code is refused.
    let mut bad = codes.clone();
    bad[301] = 0x7F;
    let (_h, m3) = mapped(&bad);
    let e = Fp8Weight::from_storage(rows, cols, Storage::map_le(&m3, 0, bad.len()).unwrap(), scales).unwrap_err();
    assert!(e.to_string().contains("NaN code at [1, 1]"), "{e}");
}

/// Resident bytes of the mapping of `path` in this process (Linux `smaps`).
#[cfg(target_os = "linux")]
fn resident_kib(path: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.to_str().unwrap();
    let mut in_it = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_it = line.ends_with(name);
        } else if in_it && let Some(rest) = line.strip_prefix("Rss:") {
            kib += rest.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
        }
    }
    kib
}

#[cfg(target_os = "linux")]
#[test]
fn dropping_the_last_handle_releases_pages_and_others_still_read() {
    const MIB: usize = 1 << 20;
    let bytes = pattern(8 * MIB);
    let (f, m) = mapped(&bytes);
    let a = Storage::<u8>::map_le(&m, 0, 8 * MIB).unwrap();
    let sum = |s: &[u8]| s.iter().map(|&b| b as u64).sum::<u64>();
    let want = sum(&bytes);
    assert_eq!(sum(&a), want);
    let touched = resident_kib(f.path());
    assert!(touched >= 8 * 1024 - 64, "touched all pages: {touched} KiB resident");
    // A clone shares the range: dropping one of two clones releases nothing.
    let b = a.clone();
    drop(a);
    assert!(resident_kib(f.path()) >= touched, "a live clone keeps the pages");
    // An independent handle of the same bytes and the map's own slice keep reading them.
    let c = Storage::<u8>::map_le(&m, 0, 8 * MIB).unwrap();
    drop(b);
    assert!(resident_kib(f.path()) < 1024, "pages released: {} KiB resident", resident_kib(f.path()));
    assert_eq!(sum(&c), want);
    assert_eq!(sum(m.bytes()), want);
}
