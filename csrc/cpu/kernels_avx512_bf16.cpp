// The CPU kernels for x86-64 with AVX-512 and AVX512_BF16 (chosen at run time when the CPU has
// them): the avx512 set, plus the bfloat16 kernels on the bf16 dot-product instruction.
#include <cstdint>

#include "kernels_isa.h"
#if RNN_EXT_HAS_BF16_KERNELS
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx2,fma,bmi2")
#include <immintrin.h>
// GCC 12's intrinsics headers start some results from a self-initialised "undefined" vector, which
// it then reports as maybe uninitialised where they are inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define RNN_EXT_VECTOR_BYTES 64
#define RNN_EXT_BF16 1
#else  // the avx512_bf16 set is never picked; only the float kernels' names are needed
#define RNN_EXT_VECTOR_BYTES 16
#endif
#define RNN_EXT_TILE_ROWS 8
#define RNN_EXT_MAX_ACC 24
#define RNN_EXT_ISA_NAME avx512_bf16
#include "kernels_impl.h"
