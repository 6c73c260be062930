// AVX-512 variant (built with -mavx512f -mavx512vl -mavx512dq -mavx512bw -mfma on x86-64 only).
#if defined(QK_BUILD_X86_VARIANTS)
#define QK_NS qk_avx512
#define QK_VW 16
#define QK_MR0 8
#define QK_NV0 2
#include "kernels_impl.h"
#endif
