// The CPU kernels for any CPU the compiler targets by default (SSE2 on x86-64, NEON on Arm).
#include <cstdint>
#define RNN_EXT_VECTOR_BYTES 16
#define RNN_EXT_TILE_ROWS 4
#define RNN_EXT_MAX_ACC 12
#define RNN_EXT_ISA_NAME baseline
#include "kernels_impl.h"
