// AVX2 + FMA variant (built with -mavx2 -mfma on x86-64 only; chosen at run time when the CPU has them).
#if defined(QK_BUILD_X86_VARIANTS)
#define QK_NS qk_avx2
#define QK_VW 8
#define QK_MR0 6
#define QK_NV0 2
#include "kernels_impl.h"
#endif
