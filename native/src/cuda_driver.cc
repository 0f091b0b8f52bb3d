// Loads the CUDA driver with dlopen at first use. A missing library, a missing symbol or a
// failing cuInit all mean "no driver": get() returns nullptr and callers skip the GPU path.

#include "recoverkit/cuda_driver.h"

#include <dlfcn.h>

#include <cstdio>
#include <mutex>

#include "recoverkit/errors.h"

namespace recoverkit {
namespace {

template <typename Fn>
bool resolve(void* lib, Fn*& out, const char* name) {
  out = reinterpret_cast<Fn*>(dlsym(lib, name));
  return out != nullptr;
}

CudaDriver* load() noexcept {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return nullptr;
  static CudaDriver d{};
  bool ok = resolve(lib, d.cuInit, "cuInit") && resolve(lib, d.cuDeviceGet, "cuDeviceGet") &&
            resolve(lib, d.cuDeviceGetCount, "cuDeviceGetCount") &&
            resolve(lib, d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") &&
            resolve(lib, d.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2") &&
            resolve(lib, d.cuCtxSetCurrent, "cuCtxSetCurrent") &&
            resolve(lib, d.cuCtxPushCurrent, "cuCtxPushCurrent_v2") &&
            resolve(lib, d.cuCtxPopCurrent, "cuCtxPopCurrent_v2") &&
            resolve(lib, d.cuStreamCreate, "cuStreamCreate") &&
            resolve(lib, d.cuStreamDestroy, "cuStreamDestroy_v2") &&
            resolve(lib, d.cuStreamWaitEvent, "cuStreamWaitEvent") &&
            resolve(lib, d.cuStreamSynchronize, "cuStreamSynchronize") &&
            resolve(lib, d.cuEventCreate, "cuEventCreate") &&
            resolve(lib, d.cuEventDestroy, "cuEventDestroy_v2") &&
            resolve(lib, d.cuEventRecord, "cuEventRecord") &&
            resolve(lib, d.cuEventSynchronize, "cuEventSynchronize") &&
            resolve(lib, d.cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2") &&
            resolve(lib, d.cuMemHostRegister, "cuMemHostRegister_v2") &&
            resolve(lib, d.cuMemHostUnregister, "cuMemHostUnregister") &&
            resolve(lib, d.cuGetErrorString, "cuGetErrorString");
  if (!ok || d.cuInit(0) != kCudaSuccess) {
    dlclose(lib);
    return nullptr;
  }
  return &d;  // the library stays loaded for the life of the process
}

}  // namespace

const CudaDriver* CudaDriver::get() noexcept {
  static std::once_flag once;
  static CudaDriver* driver = nullptr;
  std::call_once(once, [] { driver = load(); });
  return driver;
}

std::string CudaDriver::describe(const char* call, CUresult rc) const {
  const char* text = nullptr;
  if (cuGetErrorString == nullptr || cuGetErrorString(rc, &text) != kCudaSuccess || !text)
    text = "unknown CUDA error";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s failed: %s (%d)", call, text, rc);
  return buf;
}

void CudaDriver::check(const char* call, CUresult rc) const {
  if (rc != kCudaSuccess) throw CudaFailure(describe(call, rc));
}

ScopedContext::ScopedContext(const CudaDriver& drv, CUcontext ctx) : drv_(drv), pushed_(false) {
  drv_.check("cuCtxPushCurrent", drv_.cuCtxPushCurrent(ctx));
  pushed_ = true;
}

ScopedContext::~ScopedContext() {
  if (pushed_) {
    CUcontext popped = nullptr;
    drv_.cuCtxPopCurrent(&popped);
  }
}

}  // namespace recoverkit
