// Shared device helpers: exact ports of the CPU kernels' scalar functions (so that GPU
// results equal the CPU's bit for bit where the CPU tests claim it), warp reductions, and
// the error status word. Arithmetic that must round like the CPU is written with explicit
// round-to-nearest intrinsics: nvcc would otherwise contract `a * b + c` into one FMA.
// The functions are also host-callable (plain C++ with -ffp-contract=off) so that the ports
// can be checked against the Rust originals without a GPU.
#pragma once
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define DSV3_HD __host__ __device__ __forceinline__
#else
#define DSV3_HD inline
#endif

namespace dsv3 {

constexpr float NEG_INF = -__builtin_huge_valf();

DSV3_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DSV3_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DSV3_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DSV3_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DSV3_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
DSV3_HD uint32_t f2u(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
DSV3_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}
// Rust's f32::clamp: NaN stays NaN (fminf/fmaxf would drop it).
DSV3_HD float clamp_keep_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// fp8::encode_e4m3: round to nearest even, saturate at +-448, NaN -> 0x7F | sign.
DSV3_HD uint8_t encode_e4m3(float x) {
  uint32_t bits = f2u(x);
  uint32_t sign = (bits >> 24) & 0x80u;
  uint32_t b = bits & 0x7FFFFFFFu;
  uint32_t sub = f2u(add_rn(mul_rn(u2f(b), 512.0f), 8388608.0f)) - 0x4B000000u;
  uint32_t norm = ((b + (0x7FFFFu + ((b >> 20) & 1u))) >> 20) - (120u << 3);
  uint32_t code = b < 0x3C800000u ? sub : norm;
  code = code < 0x7Eu ? code : 0x7Eu;
  if (b > 0x7F800000u) code = 0x7Fu;
  return (uint8_t)(sign | code);
}

// fp8::decode_fast: exact for every non-NaN code.
DSV3_HD float decode_e4m3(uint8_t c) {
  uint32_t em = c & 0x7Fu;
  uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  float normal = u2f((em << 20) + (120u << 23));
  float sub = mul_rn((float)em, 1.0f / 512.0f);
  float mag = em >= 8 ? normal : sub;
  return u2f(f2u(mag) | sign);
}

// fp8::tile_scale: max(amax, 1e-4) / 448, optionally rounded up to a power of two.
DSV3_HD float tile_scale(float amax, bool ue8m0) {
  float s = div_rn(amax > 1e-4f ? amax : 1e-4f, 448.0f);
  if (!ue8m0) return s;
  uint32_t b = f2u(s);
  return (b & 0x007FFFFFu) == 0 ? s : u2f((b & 0x7F800000u) + 0x00800000u);
}

// act::exp_fast (Cody-Waite, Cephes degree 6, 2^n in two halves).
DSV3_HD float exp_fast(float x) {
  const float LOG2E = 1.44269504088896340736f, LN2_HI = 0.6933594f, LN2_LO = -2.1219444e-4f;
  const float ROUND = 12582912.0f;
  float xc = clamp_keep_nan(x, -104.0f, 88.8f);
  float t = add_rn(mul_rn(xc, LOG2E), ROUND);
  int32_t n = (int32_t)(f2u(t) - 0x4B400000u);
  float nf = sub_rn(t, ROUND);
  float r = sub_rn(sub_rn(xc, mul_rn(nf, LN2_HI)), mul_rn(nf, LN2_LO));
  float z = mul_rn(r, r);
  float p = 1.9875691e-4f;
  p = add_rn(mul_rn(p, r), 1.3981999e-3f);
  p = add_rn(mul_rn(p, r), 8.333452e-3f);
  p = add_rn(mul_rn(p, r), 4.1665796e-2f);
  p = add_rn(mul_rn(p, r), 1.6666665e-1f);
  p = add_rn(mul_rn(p, r), 0.5f);
  float y = add_rn(add_rn(mul_rn(p, z), r), 1.0f);
  int32_t h = n >> 1;
  float s1 = u2f((uint32_t)(h + 127) << 23);
  float s2 = u2f((uint32_t)(n - h + 127) << 23);
  return mul_rn(mul_rn(y, s1), s2);
}

// act::silu_fast: overflow-free z * sigmoid(z); silu(-inf) = -0; NaN stays NaN.
DSV3_HD float silu_fast(float z) {
  float e = exp_fast(-u2f(f2u(z) & 0x7FFFFFFFu));
  float num = z >= 0.0f ? z : mul_rn(z, e);
  float s = div_rn(num, add_rn(1.0f, e));
  return f2u(z) == 0xFF800000u ? -0.0f : s;
}

// gating::exp (Cephes expf, x clamped to [-87, 88]).
DSV3_HD float exp_gating(float x) {
  const float LOG2E = 1.44269504088896340736f, SHIFT = 12582912.0f;
  const float C1 = 0.6933594f, C2 = -2.1219444e-4f;
  x = clamp_keep_nan(x, -87.0f, 88.0f);
  float t = add_rn(mul_rn(x, LOG2E), SHIFT);
  float n = sub_rn(t, SHIFT);
  float r = sub_rn(x, mul_rn(n, C1));
  r = sub_rn(r, mul_rn(n, C2));
  float p = 1.9875691e-4f;
  p = add_rn(mul_rn(p, r), 1.3981999e-3f);
  p = add_rn(mul_rn(p, r), 8.333452e-3f);
  p = add_rn(mul_rn(p, r), 4.1665796e-2f);
  p = add_rn(mul_rn(p, r), 1.6666665e-1f);
  p = add_rn(mul_rn(p, r), 0.5f);
  p = add_rn(add_rn(mul_rn(p, mul_rn(r, r)), r), 1.0f);
  int32_t ni = (int32_t)f2u(t) - 0x4B400000;
  return mul_rn(p, u2f((uint32_t)(ni + 127) << 23));
}

// gating::sigmoid.
DSV3_HD float sigmoid_gating(float x) { return div_rn(1.0f, add_rn(1.0f, exp_gating(-x))); }

#ifdef __CUDACC__
constexpr unsigned FULL_MASK = 0xFFFFFFFFu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Records bad index `i` so that the host sees the lowest one (status = ~min i; 0 = none).
__device__ __forceinline__ void report(uint32_t* status, uint32_t i) { atomicMax(status, ~i); }
#endif

}  // namespace dsv3
