#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(RNN_EXT_NO_MULTIVERSION)
#define RNN_EXT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RNN_EXT_MULTIVERSION
#endif
#define RNN_EXT_INLINE inline __attribute__((always_inline))

namespace rnn_ext::cpu {

namespace {

// Products of at least this many multiply-adds go to ATen's GEMM (MKL/oneDNN, multithreaded).
constexpr int64_t kBlasMinMacs = int64_t{1} << 21;

// ---------------------------------------------------------------------------------------------
// Register-blocked C += A @ B. Each block keeps an MR x NR tile of C in registers while walking K.

template <typename T, int MR, int NR>
RNN_EXT_INLINE void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  T acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      acc[i][j] = C[i * ldc + j];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
      for (int j = 0; j < NR; ++j) {
        acc[i][j] += a * b[j];
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      C[i * ldc + j] = acc[i][j];
    }
  }
}

// Columns [n0, n0 + NR) for every row.
template <typename T, int NR>
RNN_EXT_INLINE void gemm_column_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int MR = 4;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    gemm_tile<T, MR, NR>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  }
  for (; m < M; ++m) {
    gemm_tile<T, 1, NR>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  }
}

template <typename T>
RNN_EXT_INLINE void small_gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int NR = 128 / sizeof(T);  // two 512-bit (four 256-bit) vectors of C per row
  int64_t n = 0;
  if (M < 4) {
    // Few rows: wide tiles give enough independent accumulators to hide the FMA latency.
    for (; n + 4 * NR <= N; n += 4 * NR) {
      gemm_column_panel<T, 4 * NR>(M, K, A, lda, B + n, ldb, C + n, ldc);
    }
  }
  for (; n + NR <= N; n += NR) {
    gemm_column_panel<T, NR>(M, K, A, lda, B + n, ldb, C + n, ldc);
  }
  for (; n + 8 <= N; n += 8) {
    gemm_column_panel<T, 8>(M, K, A, lda, B + n, ldb, C + n, ldc);
  }
  for (; n < N; ++n) {
    gemm_column_panel<T, 1>(M, K, A, lda, B + n, ldb, C + n, ldc);
  }
}

RNN_EXT_MULTIVERSION void small_gemm_acc_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  small_gemm_acc<float>(M, N, K, A, lda, B, ldb, C, ldc);
}

RNN_EXT_MULTIVERSION void small_gemm_acc_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc) {
  small_gemm_acc<double>(M, N, K, A, lda, B, ldb, C, ldc);
}

template <typename T>
void blas_gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  const auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  c.addmm_(a, b);
}

// ---------------------------------------------------------------------------------------------
// tanh in float, branch-free so that loops over it vectorise. Agrees with std::tanh to a few ulp.

template <typename To, typename From>
RNN_EXT_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

RNN_EXT_INLINE float tanh_f32(float x) {
  const float a = std::fabs(x);

  // |x| < 0.55: the odd Taylor series, which needs no subtraction of nearly equal numbers.
  const float z = x * x;
  float series = 6404582.0f / 10854718875.0f;
  series = series * z - 929569.0f / 638512875.0f;
  series = series * z + 21844.0f / 6081075.0f;
  series = series * z - 1382.0f / 155925.0f;
  series = series * z + 62.0f / 2835.0f;
  series = series * z - 17.0f / 315.0f;
  series = series * z + 2.0f / 15.0f;
  series = series * z - 1.0f / 3.0f;
  const float small = a + a * z * series;

  // Otherwise 1 - 2 / (e^{2a} + 1), with e^{2a} = 2^n * 2^f, n integer and |f| <= 1/2.
  // tanh(9) rounds to 1 in float, so clamping there keeps 2^n finite and changes nothing.
  const float t = std::min(a, 9.0f) * 2.88539008177792681f;  // 2 / ln 2
  const float n = std::floor(t + 0.5f);
  const float f = (t - n) * 0.693147180559945309f;  // ln 2
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const float e = p * bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float large = 1.0f - 2.0f / (e + 1.0f);

  const float r = a < 0.55f ? small : large;
  return std::copysign(r, x);
}

template <typename T>
RNN_EXT_INLINE T tanh_any(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_f32(x);
  } else {
    return std::tanh(x);
  }
}

template <typename T>
RNN_EXT_INLINE T relu(T x) {
  return x < T(0) ? T(0) : x;  // NaN passes through, as in torch.relu
}

template <typename T>
RNN_EXT_INLINE void activate_rows_impl(T* h, int64_t rows, int64_t H, int64_t ld, bool use_relu) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = h + r * ld;
    if (use_relu) {
      for (int64_t j = 0; j < H; ++j) row[j] = relu(row[j]);
    } else {
      for (int64_t j = 0; j < H; ++j) row[j] = tanh_any(row[j]);
    }
  }
}

template <typename T>
RNN_EXT_INLINE void scale_by_activation_grad_impl(T* grad, const T* h, int64_t rows, int64_t H, int64_t ld, bool use_relu) {
  for (int64_t r = 0; r < rows; ++r) {
    T* g = grad + r * ld;
    const T* y = h + r * ld;
    if (use_relu) {
      for (int64_t j = 0; j < H; ++j) g[j] = y[j] > T(0) ? g[j] : T(0);
    } else {
      for (int64_t j = 0; j < H; ++j) g[j] *= T(1) - y[j] * y[j];
    }
  }
}

}  // namespace

bool is_small_gemm(int64_t M, int64_t N, int64_t K) {
  return M * N * K < kBlasMinMacs;
}

void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  if (is_small_gemm(M, N, K)) {
    small_gemm_acc_f32(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    blas_gemm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  }
}

void gemm_acc(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  if (is_small_gemm(M, N, K)) {
    small_gemm_acc_f64(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    blas_gemm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  }
}

RNN_EXT_MULTIVERSION void activate_rows(float* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  activate_rows_impl(h, rows, H, ld, relu);
}

void activate_rows(double* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  activate_rows_impl(h, rows, H, ld, relu);
}

RNN_EXT_MULTIVERSION void scale_by_activation_grad(float* grad, const float* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  scale_by_activation_grad_impl(grad, h, rows, H, ld, relu);
}

RNN_EXT_MULTIVERSION void scale_by_activation_grad(double* grad, const double* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  scale_by_activation_grad_impl(grad, h, rows, H, ld, relu);
}

}  // namespace rnn_ext::cpu
