/* The few pieces of ONNX Runtime's C API (a stable ABI: a table of function pointers that only grows at its
 * end) that the kernels in this folder use, declared by position. ONNX Runtime's Python wheel ships no C
 * headers, so these declarations are mmexport's own; the positions are those of ONNX Runtime's OrtApi table
 * (unchanged since the versions that introduced them: KernelContext_ParallelFor, the newest used, in API 17,
 * ONNX Runtime 1.17), read from ONNX Runtime's sources; synthetic.py exercises every one of them (registration,
 * attributes, inputs, outputs, the thread pool) against the installed ONNX Runtime. */
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef void *OrtApiFn;                    /* one entry of the table */
typedef struct { OrtApiFn fn[275]; } OrtApi; /* entries 0..274 are all this file reads */
typedef struct {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

#define MMX_ORT_API_VERSION 17 /* KernelContext_ParallelFor */

enum { MMX_TYPE_FLOAT = 1, MMX_TYPE_UINT8 = 2 };          /* ONNXTensorElementDataType */
enum { MMX_IO_REQUIRED = 0, MMX_IO_OPTIONAL = 1 };        /* OrtCustomOpInputOutputCharacteristic */

/* positions in OrtApi */
#define MMX_CreateStatus 0
#define MMX_GetErrorMessage 2
#define MMX_CreateCustomOpDomain 26
#define MMX_CustomOpDomain_Add 27
#define MMX_AddCustomOpDomain 28
#define MMX_GetTensorMutableData 51
#define MMX_GetDimensionsCount 61
#define MMX_GetDimensions 62
#define MMX_GetTensorTypeAndShape 65
#define MMX_KernelInfoGetAttribute_int64 86
#define MMX_KernelContext_GetInputCount 88
#define MMX_KernelContext_GetInput 90
#define MMX_KernelContext_GetOutput 91
#define MMX_ReleaseStatus 93
#define MMX_ReleaseTensorTypeAndShapeInfo 99
#define MMX_KernelContext_ParallelFor 274

typedef OrtStatus *(*mmx_CreateStatus)(int code, const char *msg);
typedef OrtStatus *(*mmx_CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*mmx_CustomOpDomain_Add)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*mmx_AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*mmx_GetTensorMutableData)(OrtValue *value, void **out);
typedef OrtStatus *(*mmx_GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*mmx_GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);
typedef OrtStatus *(*mmx_GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*mmx_KernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*mmx_KernelContext_GetInputCount)(const OrtKernelContext *ctx, size_t *out);
typedef OrtStatus *(*mmx_KernelContext_GetInput)(const OrtKernelContext *ctx, size_t index, const OrtValue **out);
typedef OrtStatus *(*mmx_KernelContext_GetOutput)(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t n, OrtValue **out);
typedef void (*mmx_ReleaseStatus)(OrtStatus *s);
typedef void (*mmx_ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*mmx_KernelContext_ParallelFor)(const OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total,
                                                    size_t num_batch, void *user_data);
#define MMX_CALL(api, name) ((mmx_##name)((api)->fn[MMX_##name]))

/* OrtCustomOp, as far as version 16 (optional inputs; kernels that return a status) */
typedef struct MmxCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct MmxCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct MmxCustomOp *op);
  const char *(*GetExecutionProviderType)(const struct MmxCustomOp *op);
  int (*GetInputType)(const struct MmxCustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct MmxCustomOp *op);
  int (*GetOutputType)(const struct MmxCustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct MmxCustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct MmxCustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct MmxCustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct MmxCustomOp *op, size_t index);
  int (*GetVariadicInputMinArity)(const struct MmxCustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct MmxCustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct MmxCustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct MmxCustomOp *op);
  OrtStatus *(*CreateKernelV2)(const struct MmxCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
} MmxCustomOp;
#define MMX_OP_VERSION 16
