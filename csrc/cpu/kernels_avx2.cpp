// The CPU kernels for x86-64 with AVX2 and FMA (chosen at run time when the CPU has them).
#include <cstdint>
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,bmi2")
#define RNN_EXT_VECTOR_BYTES 32
#else
#define RNN_EXT_VECTOR_BYTES 16
#endif
#define RNN_EXT_TILE_ROWS 4
#define RNN_EXT_MAX_ACC 12
#define RNN_EXT_ISA_NAME avx2
#include "kernels_impl.h"
