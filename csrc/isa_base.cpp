// Portable variant: the compiler's default target for this platform (SSE2 on x86-64, NEON on aarch64).
#define QK_NS qk_base
#define QK_VW 4
#define QK_MR0 6
#define QK_NV0 2
#include "kernels_impl.h"
