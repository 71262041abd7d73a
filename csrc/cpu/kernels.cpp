#include "kernels.h"

#include "kernels_isa.h"

namespace rnn_ext::cpu {

namespace {

// Products of at least this many multiply-adds go to ATen's GEMM (MKL/oneDNN, multithreaded).
constexpr int64_t kBlasMinMacs = int64_t{1} << 21;

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename T>
IsaKernels<T> pick(IsaKernels<T> (*avx512)(), IsaKernels<T> (*avx2)(), IsaKernels<T> (*baseline)()) {
  if (cpu_has_avx512()) return avx512();
  if (cpu_has_avx2()) return avx2();
  return baseline();
}

const IsaKernels<float>& kernels_f32() {
  static const IsaKernels<float> k = pick(&avx512_kernels_f32, &avx2_kernels_f32, &baseline_kernels_f32);
  return k;
}

const IsaKernels<double>& kernels_f64() {
  static const IsaKernels<double> k = pick(&avx512_kernels_f64, &avx2_kernels_f64, &baseline_kernels_f64);
  return k;
}

template <typename T>
const IsaKernels<T>& kernels_for();
template <>
const IsaKernels<float>& kernels_for<float>() { return kernels_f32(); }
template <>
const IsaKernels<double>& kernels_for<double>() { return kernels_f64(); }

template <typename T>
void blas_gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  const auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  c.addmm_(a, b);
}

template <typename T>
void gemm_acc_any(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  if (is_small_gemm(M, N, K)) {
    kernels_for<T>().gemm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    blas_gemm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  }
}

}  // namespace

bool is_small_gemm(int64_t M, int64_t N, int64_t K) {
  return M * N * K < kBlasMinMacs;
}

void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  gemm_acc_any(M, N, K, A, lda, B, ldb, C, ldc);
}

void gemm_acc(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc) {
  gemm_acc_any(M, N, K, A, lda, B, ldb, C, ldc);
}

void activate_rows(float* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  kernels_f32().activate_rows(h, rows, H, ld, relu);
}

void activate_rows(double* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  kernels_f64().activate_rows(h, rows, H, ld, relu);
}

void scale_by_activation_grad(float* grad, const float* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  kernels_f32().scale_by_activation_grad(grad, h, rows, H, ld, relu);
}

void scale_by_activation_grad(double* grad, const double* h, int64_t rows, int64_t H, int64_t ld, bool relu) {
  kernels_f64().scale_by_activation_grad(grad, h, rows, H, ld, relu);
}

}  // namespace rnn_ext::cpu
