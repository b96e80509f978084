//! Small AVX-512 building blocks shared by several kernel families.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// `out[e][i] = r[i][e]`: a 16 x 16 transpose in three shuffle stages (pairs of rows
    /// within 128-bit lanes, then quads, then the lanes themselves).
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // t[2a], t[2a+1]: rows 2a, 2a+1 interleaved (elements 4L, 4L+1 / 4L+2, 4L+3 of lane L).
        let mut t = [_mm512_setzero_ps(); 16];
        for a in 0..8 {
            t[2 * a] = _mm512_unpacklo_ps(r[2 * a], r[2 * a + 1]);
            t[2 * a + 1] = _mm512_unpackhi_ps(r[2 * a], r[2 * a + 1]);
        }
        // u[4b + k], lane L: element 4L + k of rows 4b..4b+4.
        let mut u = [_mm512_setzero_ps(); 16];
        for b in 0..4 {
            u[4 * b] = _mm512_shuffle_ps::<0x44>(t[4 * b], t[4 * b + 2]);
            u[4 * b + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * b], t[4 * b + 2]);
            u[4 * b + 2] = _mm512_shuffle_ps::<0x44>(t[4 * b + 1], t[4 * b + 3]);
            u[4 * b + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * b + 1], t[4 * b + 3]);
        }
        // out[4L + k] = lane L of u[k], u[4 + k], u[8 + k], u[12 + k].
        let mut out = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let x0 = _mm512_shuffle_f32x4::<0x44>(u[k], u[4 + k]);
            let x1 = _mm512_shuffle_f32x4::<0xEE>(u[k], u[4 + k]);
            let x2 = _mm512_shuffle_f32x4::<0x44>(u[8 + k], u[12 + k]);
            let x3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + k], u[12 + k]);
            out[k] = _mm512_shuffle_f32x4::<0x88>(x0, x2);
            out[4 + k] = _mm512_shuffle_f32x4::<0xDD>(x0, x2);
            out[8 + k] = _mm512_shuffle_f32x4::<0x88>(x1, x3);
            out[12 + k] = _mm512_shuffle_f32x4::<0xDD>(x1, x3);
        }
        out
    }

    /// The first 16 values of `x`.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn load16(x: &[f32]) -> __m512 {
        let c: &[f32; 16] = match x.first_chunk() {
            Some(c) => c,
            None => unreachable!("at least 16 values"),
        };
        // SAFETY: `c` is a reference to 16 initialised f32; loadu has no alignment requirement.
        unsafe { _mm512_loadu_ps(c.as_ptr()) }
    }

    /// Stores 16 values at the start of `x`.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn store16(x: &mut [f32], v: __m512) {
        let c: &mut [f32; 16] = match x.first_chunk_mut() {
            Some(c) => c,
            None => unreachable!("at least 16 values"),
        };
        // SAFETY: `c` is an exclusive reference to 16 f32; storeu has no alignment requirement.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), v) }
    }
}
