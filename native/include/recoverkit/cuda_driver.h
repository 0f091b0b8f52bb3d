// The CUDA driver API, loaded at run time with dlopen("libcuda.so.1"). Nothing links
// against CUDA: on a machine without a driver every entry point stays null and
// CudaDriver::get() returns nullptr; that is not an error. Only the handful of calls the
// staging pool and the copy engine need are declared here, with the driver's own ABI.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace recoverkit {

using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUdeviceptr = unsigned long long;

constexpr CUresult kCudaSuccess = 0;
constexpr CUresult kCudaErrorNotReady = 600;
constexpr unsigned kCuStreamNonBlocking = 0x1;
constexpr unsigned kCuEventDisableTiming = 0x2;
constexpr unsigned kCuMemHostRegisterPortable = 0x1;

struct CudaDriver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuStreamCreate)(CUstream*, unsigned);
  CUresult (*cuStreamDestroy)(CUstream);
  CUresult (*cuStreamWaitEvent)(CUstream, CUevent, unsigned);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuEventCreate)(CUevent*, unsigned);
  CUresult (*cuEventDestroy)(CUevent);
  CUresult (*cuEventRecord)(CUevent, CUstream);
  CUresult (*cuEventSynchronize)(CUevent);
  CUresult (*cuMemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream);
  CUresult (*cuMemHostRegister)(void*, size_t, unsigned);
  CUresult (*cuMemHostUnregister)(void*);
  CUresult (*cuGetErrorString)(CUresult, const char**);

  // The loaded and initialised driver (cuInit(0) succeeded), or nullptr. Thread-safe;
  // the first call does the work and later calls return the cached answer.
  static const CudaDriver* get() noexcept;

  // "cuFoo failed: CUDA_ERROR_... (code)" for messages.
  std::string describe(const char* call, CUresult rc) const;

  // Throws CudaFailure when rc is not success.
  void check(const char* call, CUresult rc) const;
};

// Makes `ctx` current on this thread for the lifetime of the guard (push / pop).
class ScopedContext {
 public:
  ScopedContext(const CudaDriver& drv, CUcontext ctx);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

 private:
  const CudaDriver& drv_;
  bool pushed_;
};

}  // namespace recoverkit
