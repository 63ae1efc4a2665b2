#pragma once
// Eight float lanes as a GCC/Clang vector type, for the hand-written CPU
// kernels (attention, similarity). Functions marked VITLAB_CLONES are
// compiled for AVX2+FMA and for the x86-64 baseline, picked at load time,
// so one binary runs everywhere and uses FMA where there is one.
#include <ATen/Config.h>

#include <cstdint>
#include <cstring>

// The kernels split their work with at::parallel_for, which without OpenMP
// here would run on one thread while LibTorch's own operators use them all.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "compile with OpenMP (CMake links OpenMP::OpenMP_CXX): at::parallel_for is serial without it"
#endif

// GCC only. Clang 14's resolver dispatches "arch=x86-64-v3" on a CPU
// vendor of 0 (llvm/llvm-project#55830), so its baseline clone always runs,
// and that clone is built without the command line's -mavx2 -mfma: a Lanes
// helper left out of line there takes its vectors in ymm registers while
// the clone passes xmm pairs (the wrong results once seen), and without
// -mavx2 clang rejects every Lanes call in the clones ("AVX vector return
// ... changes the ABI"). Clang builds take the target from their flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VITLAB_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VITLAB_CLONES
#endif

namespace vitlab::simd {

constexpr int64_t kW = 8;
typedef float Lanes __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kW * sizeof(int32_t))));

// Lanes travel by value, which keeps them in registers. Every function
// taking or returning Lanes must be inlined (VITLAB_LANES): an out-of-line
// copy is compiled once, for the baseline ABI (lanes in memory), and an
// AVX2 clone calling it passes them in registers, so it computes garbage.
// With that guaranteed, GCC's -Wpsabi note at every call is moot
// (kernels/CMakeLists.txt turns it off).
#define VITLAB_LANES [[gnu::always_inline]] inline

// Unaligned, as heap blocks need not be 32-byte aligned.
VITLAB_LANES Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

VITLAB_LANES void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

VITLAB_LANES Lanes splat(float x) { return Lanes{} + x; }

VITLAB_LANES float sum(Lanes v) {
  float s = 0;
  for (int64_t w = 0; w < kW; ++w) s += v[w];
  return s;
}

// Lanes of a (0-7) and b (8-15) picked by eight constant indices; GCC and
// Clang spell it differently.
#if defined(__clang__)
#define VITLAB_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define VITLAB_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IntLanes{__VA_ARGS__})
#endif

// The lane sums of v[0..7] as one vector: lane k is the sum of v[k]'s
// lanes (three rounds of pairwise shuffles and adds).
VITLAB_LANES Lanes sum8(const Lanes* v) {
  Lanes t[4];
  for (int k = 0; k < 4; ++k)
    t[k] = VITLAB_SHUFFLE(v[2 * k], v[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           VITLAB_SHUFFLE(v[2 * k], v[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  const Lanes u0 =
      VITLAB_SHUFFLE(t[0], t[1], 0, 1, 8, 9, 4, 5, 12, 13) + VITLAB_SHUFFLE(t[0], t[1], 2, 3, 10, 11, 6, 7, 14, 15);
  const Lanes u1 =
      VITLAB_SHUFFLE(t[2], t[3], 0, 1, 8, 9, 4, 5, 12, 13) + VITLAB_SHUFFLE(t[2], t[3], 2, 3, 10, 11, 6, 7, 14, 15);
  return VITLAB_SHUFFLE(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) + VITLAB_SHUFFLE(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

VITLAB_LANES float max(Lanes v) {
  float m = v[0];
  for (int64_t w = 1; w < kW; ++w) m = v[w] > m ? v[w] : m;
  return m;
}

// e^x, Cephes' single-precision polynomial (about 1 ulp, as ATen's SLEEF
// kernel); 0 below -88.37.
VITLAB_LANES Lanes exp(Lanes x) {
  const float hi = 88.3762626647949f;
  x = x > hi ? splat(hi) : x;
  x = x < -hi ? splat(-hi) : x;
  Lanes n = x * 1.44269504088896341f + 0.5f;
  Lanes floor_n = __builtin_convertvector(__builtin_convertvector(n, IntLanes), Lanes);  // toward zero
  n = floor_n > n ? floor_n - 1.0f : floor_n;
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  Lanes y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x +
             1.6666665459e-1f) *
                x +
            5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const IntLanes bits = (__builtin_convertvector(n, IntLanes) + 127) << 23;  // 2^n
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// x ln x, Cephes' single-precision logarithm (about 1 ulp); 0 for x below
// the smallest normal float (0 ln 0 = 0, and denormal probabilities add
// less than 1e-36), and for x < 0.
VITLAB_LANES Lanes xlogx(Lanes x) {
  constexpr float kMinNormal = 1.17549435e-38f;
  const IntLanes valid = x >= kMinNormal;
  const Lanes safe = valid ? x : splat(1.0f);
  IntLanes bits;
  std::memcpy(&bits, &safe, sizeof bits);
  Lanes e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, Lanes);  // safe = m 2^e, m in [0.5, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  Lanes m;
  std::memcpy(&m, &bits, sizeof m);
  const IntLanes small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const Lanes z = m * m;
  Lanes y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
                 1.4249322787e-1f) *
                    m -
                1.6668057665e-1f) *
                   m +
               2.0000714765e-1f) *
                  m -
              2.4999993993e-1f) *
                 m +
             3.3333331174e-1f) *
            m * z;
  y = y + -2.12194440e-4f * e - 0.5f * z;
  const Lanes log = m + y + 0.693359375f * e;
  return valid ? x * log : Lanes{};
}

}  // namespace vitlab::simd
