/* mmexport.MatMulNBitsVnni: ONNX Runtime's com.microsoft.MatMulNBits (4 bits, symmetric, no zero points, no
 * g_idx, blocks of a multiple of 32, K a multiple of 64) with this folder's AVX-512 VNNI kernel (nbits_compute.h).
 * Inputs: A float [..., K], B uint8 [N, K/bs, bs/2], scales float [N * K/bs], bias float [N] (optional).
 * Attributes: K, N, bits (4), block_size. Output: Y float [..., N].
 * Built by mmexport/cpukernels/__init__.py with the machine's C compiler; loaded by ONNX Runtime through
 * SessionOptions.register_custom_ops_library, whose entry point is RegisterCustomOps below. */
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"
#include "nbits_compute.h"

static const OrtApi *g_api;
#define API(name) MMX_CALL(g_api, name)
#define CHECK(expr) do { OrtStatus *st_ = (expr); if (st_) return st_; } while (0)
#define FAIL(msg) return API(CreateStatus)(1 /* ORT_FAIL */, (msg))

typedef struct { int64_t K, N, bs; } Kernel;

static const char *op_name(const MmxCustomOp *op) { (void)op; return "MatMulNBitsVnni"; }
static const char *op_ep(const MmxCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int in_type(const MmxCustomOp *op, size_t i) { (void)op; return i == 1 ? MMX_TYPE_UINT8 : MMX_TYPE_FLOAT; }
static size_t in_count(const MmxCustomOp *op) { (void)op; return 4; }
static int out_type(const MmxCustomOp *op, size_t i) { (void)op; (void)i; return MMX_TYPE_FLOAT; }
static size_t out_count(const MmxCustomOp *op) { (void)op; return 1; }
static int in_char(const MmxCustomOp *op, size_t i) { (void)op; return i == 3 ? MMX_IO_OPTIONAL : MMX_IO_REQUIRED; }
static int out_char(const MmxCustomOp *op, size_t i) { (void)op; (void)i; return MMX_IO_REQUIRED; }
static int in_mem(const MmxCustomOp *op, size_t i) { (void)op; (void)i; return 0; /* OrtMemTypeDefault */ }
static int zero(const MmxCustomOp *op) { (void)op; return 0; }
static void destroy(void *k) { free(k); }

static OrtStatus *create(const MmxCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op; (void)api;
  int64_t bits = 0;
  Kernel *k = calloc(1, sizeof(Kernel));
  if (!k) FAIL("MatMulNBitsVnni: out of memory");
  OrtStatus *st = API(KernelInfoGetAttribute_int64)(info, "K", &k->K);
  if (!st) st = API(KernelInfoGetAttribute_int64)(info, "N", &k->N);
  if (!st) st = API(KernelInfoGetAttribute_int64)(info, "block_size", &k->bs);
  if (!st) st = API(KernelInfoGetAttribute_int64)(info, "bits", &bits);
  if (st) { free(k); return st; }
  if (bits != 4 || k->bs < 32 || k->bs % 32 || k->K % 64 || k->K % k->bs || k->N < 1) {
    free(k);
    FAIL("MatMulNBitsVnni: needs bits=4, block_size a multiple of 32, K a multiple of 64 and of block_size");
  }
  *out = k;
  return NULL;
}

static OrtStatus *shape_of(const OrtValue *v, int64_t *dims, size_t *n, size_t cap) {
  OrtTensorTypeAndShapeInfo *info;
  CHECK(API(GetTensorTypeAndShape)(v, &info));
  OrtStatus *st = API(GetDimensionsCount)(info, n);
  if (!st && *n > cap) st = API(CreateStatus)(1, "MatMulNBitsVnni: input has too many dimensions");
  if (!st) st = API(GetDimensions)(info, dims, *n);
  API(ReleaseTensorTypeAndShapeInfo)(info);
  return st;
}

typedef struct {
  const uint8_t *B; const float *S; const float *bias; float *Y; const mmx_act *act;
  int M, K, N, bs, blocks, per_batch;
} Work;

static void run_batch(void *p, size_t i) {
  const Work *w = p;
  int b0 = (int)i * w->per_batch, b1 = b0 + w->per_batch < w->blocks ? b0 + w->per_batch : w->blocks;
  for (int b = b0; b < b1; b++) {
    int n0 = b * MMX_NBLOCK, n1 = n0 + MMX_NBLOCK < w->N ? n0 + MMX_NBLOCK : w->N;
    mmx_rows(w->B, w->S, w->act, w->bias, w->Y, w->M, w->K, w->N, w->bs, n0, n1);
  }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *k = kernel;
  const OrtValue *in[4] = {0};
  size_t count = 0;
  CHECK(API(KernelContext_GetInputCount)(ctx, &count));
  for (size_t i = 0; i < 4 && i < count; i++) CHECK(API(KernelContext_GetInput)(ctx, i, &in[i]));
  int64_t dims[8];
  size_t nd = 0;
  CHECK(shape_of(in[0], dims, &nd, 8));
  if (nd < 1 || dims[nd - 1] != k->K) FAIL("MatMulNBitsVnni: A's last dimension is not K");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < nd; i++) M *= dims[i];
  dims[nd - 1] = k->N;
  OrtValue *out;
  CHECK(API(KernelContext_GetOutput)(ctx, 0, dims, nd, &out));
  void *a, *b, *s, *bias = NULL, *y;
  CHECK(API(GetTensorMutableData)((OrtValue *)in[0], &a));
  CHECK(API(GetTensorMutableData)((OrtValue *)in[1], &b));
  CHECK(API(GetTensorMutableData)((OrtValue *)in[2], &s));
  if (in[3]) CHECK(API(GetTensorMutableData)((OrtValue *)in[3], &bias));
  CHECK(API(GetTensorMutableData)(out, &y));
  if (M == 0) return NULL;

  const int K = (int)k->K, N = (int)k->N, bs = (int)k->bs, nb = K / bs, np = K / 64;
  /* per row: q (K), scale and sum (nb each), lane scale and correction (16 per pair) */
  size_t per_row = (size_t)K + 8 * (size_t)nb + 128 * (size_t)np;
  char *buf = aligned_alloc(64, ((sizeof(mmx_act) + per_row) * (size_t)M + 63) / 64 * 64 + 64);
  if (!buf) FAIL("MatMulNBitsVnni: out of memory");
  mmx_act *act = (mmx_act *)buf;
  char *p = buf + ((sizeof(mmx_act) * (size_t)M + 63) / 64) * 64;
  for (int64_t m = 0; m < M; m++) {
    act[m].lane_scale = (float *)p; p += 64 * (size_t)np;
    act[m].lane_corr = (int32_t *)p; p += 64 * (size_t)np;
    act[m].q = (int8_t *)p; p += K;
    act[m].scale = (float *)p; p += 4 * (size_t)nb;
    act[m].sum = (int32_t *)p; p += 4 * (size_t)nb;
    mmx_quantize_row((const float *)a + m * K, K, bs, &act[m]);
  }
  Work w = {b, s, bias, y, act, (int)M, K, N, bs, (N + MMX_NBLOCK - 1) / MMX_NBLOCK, 1};
  /* 16 runs of contiguous rows, taken by the pool's threads as they come free (measured on 2 cores: one run per core
   * was slowest, 15-17 GB/s, since a late thread holds the other back; 16 to 64 runs gave 20-27; env MMX_BATCHES) */
  long want = getenv("MMX_BATCHES") ? atol(getenv("MMX_BATCHES")) : 16;
  size_t batches = (size_t)(want < 1 ? 1 : want > w.blocks ? w.blocks : want);
  w.per_batch = (w.blocks + (int)batches - 1) / (int)batches;
  batches = (size_t)((w.blocks + w.per_batch - 1) / w.per_batch);
  OrtStatus *st = API(KernelContext_ParallelFor)(ctx, run_batch, batches, 0, &w);
  free(buf);
  return st;
}

static void *create_v1(const MmxCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
  void *k = NULL;
  OrtStatus *st = create(op, api, info, &k);
  if (st) API(ReleaseStatus)(st);
  return k;
}
static void compute_v1(void *kernel, OrtKernelContext *ctx) {
  OrtStatus *st = compute(kernel, ctx);
  if (st) API(ReleaseStatus)(st);
}

static const MmxCustomOp g_op = {
  MMX_OP_VERSION, create_v1, op_name, op_ep, in_type, in_count, out_type, out_count, compute_v1, destroy,
  in_char, out_char, in_mem, zero, zero, zero, zero, create, compute,
};

/* Whether this CPU runs the kernel: AVX-512 F/BW/VL and VNNI, and the OS saves the zmm state. */
int mmx_cpu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  g_api = base->GetApi(MMX_ORT_API_VERSION);
  if (!g_api) return NULL; /* an ONNX Runtime older than 1.17: cannot report through it either */
  if (!mmx_cpu_supported()) FAIL("mmexport CPU kernels: this CPU lacks AVX-512 VNNI");
  OrtCustomOpDomain *domain;
  CHECK(API(CreateCustomOpDomain)("mmexport", &domain));
  CHECK(API(CustomOpDomain_Add)(domain, &g_op));
  return API(AddCustomOpDomain)(options, domain);
}
