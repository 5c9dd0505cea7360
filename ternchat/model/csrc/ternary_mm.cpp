// Ternary matrix product for decoding: int8 activations times 2-bit packed ternary codes, int32 out.
//
// ternchat::ternary_mm(x, packed, n) -> (M, n) int32 with out[m, r] = sum_k x[m, k] * code[r, k], where code is
// in {-1, 0, +1}. `packed` is (n, K / 4) uint8: for each group of 64 inputs, 16 bytes whose byte j holds
// code + 1 of inputs j, 16 + j, 32 + j and 48 + j in bits 0-1, 2-3, 4-5 and 6-7 (K is a multiple of 64).
// With AVX512-VNNI a group is one 16-byte load, broadcast to four 128-bit lanes, shifted by 0/2/4/6 bits
// and masked to 64 unsigned bytes in {0, 1, 2}; vpdpbusd multiplies them with the 64 signed activation
// bytes and sums into int32, and sum_k x[m, k] is subtracted once per row to undo the +1. Weights are read
// at 2 bits each and never widened in memory. Without AVX512-VNNI a portable loop computes the same sums.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TERNCHAT_VNNI 1
#endif

namespace {

constexpr int64_t kGroup = 64;

void rows_portable(const int8_t* x, const uint8_t* packed, int32_t* out, int64_t M, int64_t K, int64_t N,
                   int64_t r0, int64_t r1) {
  const int64_t row_bytes = K / 4;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = packed + r * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = x + m * K;
      int32_t acc = 0;
      for (int64_t g = 0; g < K / kGroup; ++g) {
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = w[g * 16 + j];
          for (int part = 0; part < 4; ++part) {
            const int code = ((byte >> (2 * part)) & 3) - 1;
            acc += code * xm[g * kGroup + part * 16 + j];
          }
        }
      }
      out[m * N + r] = acc;
    }
  }
}

#ifdef TERNCHAT_VNNI
void rows_vnni(const int8_t* x, const uint8_t* packed, int32_t* out, int64_t M, int64_t K, int64_t N,
               const int32_t* x_sums, int64_t r0, int64_t r1) {
  const int64_t groups = K / kGroup, row_bytes = K / 4;
  const __m512i shift16 = _mm512_set_epi16(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4,
                                           2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);  // lane i: 2i bits
  const __m512i three = _mm512_set1_epi8(3);
  auto unpack = [&](const uint8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(bytes), shift16), three);
  };
  int64_t r = r0;
  if (M == 1) {  // decoding: four weight rows at a time, four independent accumulation chains
    for (; r + 4 <= r1; r += 4) {
      const uint8_t* w = packed + r * row_bytes;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t g = 0; g < groups; ++g) {
        const __m512i xv = _mm512_loadu_si512(x + g * kGroup);
        a0 = _mm512_dpbusd_epi32(a0, unpack(w + g * 16), xv);
        a1 = _mm512_dpbusd_epi32(a1, unpack(w + row_bytes + g * 16), xv);
        a2 = _mm512_dpbusd_epi32(a2, unpack(w + 2 * row_bytes + g * 16), xv);
        a3 = _mm512_dpbusd_epi32(a3, unpack(w + 3 * row_bytes + g * 16), xv);
      }
      out[r] = _mm512_reduce_add_epi32(a0) - x_sums[0];
      out[r + 1] = _mm512_reduce_add_epi32(a1) - x_sums[0];
      out[r + 2] = _mm512_reduce_add_epi32(a2) - x_sums[0];
      out[r + 3] = _mm512_reduce_add_epi32(a3) - x_sums[0];
    }
  }
  constexpr int64_t kRowsAtOnce = 8;  // activation rows sharing one unpacked weight group
  for (; r < r1; ++r) {
    const uint8_t* w = packed + r * row_bytes;
    for (int64_t m0 = 0; m0 < M; m0 += kRowsAtOnce) {
      const int64_t mc = std::min<int64_t>(kRowsAtOnce, M - m0);
      __m512i acc[kRowsAtOnce];
      for (int64_t i = 0; i < mc; ++i) acc[i] = _mm512_setzero_si512();
      for (int64_t g = 0; g < groups; ++g) {
        const __m512i codes = unpack(w + g * 16);
        for (int64_t i = 0; i < mc; ++i) {
          const __m512i xv = _mm512_loadu_si512(x + (m0 + i) * K + g * kGroup);
          acc[i] = _mm512_dpbusd_epi32(acc[i], codes, xv);
        }
      }
      for (int64_t i = 0; i < mc; ++i) out[(m0 + i) * N + r] = _mm512_reduce_add_epi32(acc[i]) - x_sums[m0 + i];
    }
  }
}
#endif

at::Tensor ternary_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.dtype() == at::kChar && packed.dtype() == at::kByte, "ternary_mm: int8 x and uint8 packed codes");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && packed.size(0) == n, "ternary_mm: x (M, K), packed (n, K / 4)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup == 0 && packed.size(1) * 4 == K, "ternary_mm: K must be a multiple of 64 and match packed");
  auto xc = x.contiguous();
  auto pc = packed.contiguous();
  auto out = at::empty({M, n}, x.options().dtype(at::kInt));
  const int8_t* xp = xc.data_ptr<int8_t>();
  const uint8_t* wp = pc.data_ptr<uint8_t>();
  int32_t* op = out.data_ptr<int32_t>();
#ifdef TERNCHAT_VNNI
  std::vector<int32_t> sums(M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) sums[m] += xp[m * K + k];
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) { rows_vnni(xp, wp, op, M, K, n, sums.data(), r0, r1); });
#else
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) { rows_portable(xp, wp, op, M, K, n, r0, r1); });
#endif
  return out;
}

bool vnni() {
#ifdef TERNCHAT_VNNI
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(ternchat, m) {
  m.def("ternary_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("ternary_mm_vectorized() -> bool", &vnni);
}

TORCH_LIBRARY_IMPL(ternchat, CPU, m) { m.impl("ternary_mm", &ternary_mm); }
