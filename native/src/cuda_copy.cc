// Device-to-host copies on a dedicated stream per device (see cuda_copy.h).

#include "recoverkit/cuda_copy.h"

#include <algorithm>

#include "recoverkit/crc32c.h"
#include "recoverkit/errors.h"

namespace recoverkit {
namespace {
constexpr size_t kDepth = 4;  // chunks in flight ahead of the one being checksummed
}  // namespace

CudaCopyDevice::CudaCopyDevice(const CudaDriver& drv, int ordinal) : drv_(drv) {
  drv_.check("cuDeviceGet", drv_.cuDeviceGet(&dev_, ordinal));
  drv_.check("cuDevicePrimaryCtxRetain", drv_.cuDevicePrimaryCtxRetain(&ctx_, dev_));
  try {
    ScopedContext scope(drv_, ctx_);
    drv_.check("cuStreamCreate", drv_.cuStreamCreate(&stream_, kCuStreamNonBlocking));
  } catch (...) {
    drv_.cuDevicePrimaryCtxRelease(dev_);
    throw;
  }
}

CudaCopyDevice::~CudaCopyDevice() {
  if (drv_.cuCtxPushCurrent(ctx_) == kCudaSuccess) {
    drv_.cuStreamSynchronize(stream_);
    for (CUevent ev : free_events_) drv_.cuEventDestroy(ev);
    drv_.cuStreamDestroy(stream_);
    CUcontext popped = nullptr;
    drv_.cuCtxPopCurrent(&popped);
  }
  drv_.cuDevicePrimaryCtxRelease(dev_);
}

CUevent CudaCopyDevice::take_event() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_events_.empty()) {
      CUevent ev = free_events_.back();
      free_events_.pop_back();
      return ev;
    }
  }
  CUevent ev = nullptr;
  drv_.check("cuEventCreate", drv_.cuEventCreate(&ev, kCuEventDisableTiming));
  return ev;
}

void CudaCopyDevice::give_event(CUevent ev) {
  std::lock_guard<std::mutex> lock(mu_);
  free_events_.push_back(ev);
}

CUevent CudaCopyDevice::record_producer(uintptr_t stream) {
  ScopedContext scope(drv_, ctx_);
  CUevent ev = take_event();
  CUresult rc = drv_.cuEventRecord(ev, reinterpret_cast<CUstream>(stream));
  if (rc != kCudaSuccess) {
    give_event(ev);
    drv_.check("cuEventRecord on the producing stream", rc);
  }
  return ev;
}

void CudaCopyDevice::copy_to_host(CUevent producer, void* dst, uintptr_t src, size_t n,
                                  size_t chunk_bytes, uint32_t* crc_out) {
  drv_.check("cuCtxSetCurrent", drv_.cuCtxSetCurrent(ctx_));
  CUevent ring[kDepth] = {};
  size_t nring = 0;
  auto* out = static_cast<uint8_t*>(dst);
  const size_t nchunks = (n + chunk_bytes - 1) / chunk_bytes;
  uint32_t crc = 0;
  size_t landed = 0;  // chunks synchronized (and checksummed)
  auto land_next = [&] {
    const size_t off = landed * chunk_bytes, len = std::min(chunk_bytes, n - off);
    drv_.check("cuEventSynchronize", drv_.cuEventSynchronize(ring[landed % kDepth]));
    if (crc_out) crc = crc32c_extend(crc, out + off, len);
    landed++;
  };
  try {
    drv_.check("cuStreamWaitEvent", drv_.cuStreamWaitEvent(stream_, producer, 0));
    for (; nring < std::min(kDepth, nchunks); nring++) ring[nring] = take_event();
    for (size_t i = 0; i < nchunks; i++) {
      if (i >= kDepth) land_next();  // frees ring slot i % kDepth
      const size_t off = i * chunk_bytes, len = std::min(chunk_bytes, n - off);
      drv_.check("cuMemcpyDtoHAsync",
                 drv_.cuMemcpyDtoHAsync(out + off, static_cast<CUdeviceptr>(src + off), len, stream_));
      drv_.check("cuEventRecord", drv_.cuEventRecord(ring[i % kDepth], stream_));
    }
    while (landed < nchunks) land_next();
  } catch (...) {
    drv_.cuStreamSynchronize(stream_);  // nothing may still be writing into dst
    for (size_t i = 0; i < nring; i++) give_event(ring[i]);
    give_event(producer);
    throw;
  }
  for (size_t i = 0; i < nring; i++) give_event(ring[i]);
  give_event(producer);
  if (crc_out) *crc_out = crc;
}

}  // namespace recoverkit
