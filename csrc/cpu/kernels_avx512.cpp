// The CPU kernels for x86-64 with AVX-512 (chosen at run time when the CPU has it).
#include <cstdint>
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")
#define RNN_EXT_VECTOR_BYTES 64
#else
#define RNN_EXT_VECTOR_BYTES 16
#endif
#define RNN_EXT_TILE_ROWS 8
#define RNN_EXT_MAX_ACC 24
#define RNN_EXT_ISA_NAME avx512
#include "kernels_impl.h"
