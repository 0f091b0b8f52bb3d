// Device-to-host copies for the copy engine, through the dynamically loaded driver.
//
// One CudaCopyDevice per device ordinal holds a retained primary context, a dedicated
// non-blocking copy stream and a pool of timing-free events. The producing stream's work is
// ordered before the copy by an event recorded on it at submit (record_producer) that the
// copy stream waits on (copy_to_host).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "recoverkit/cuda_driver.h"

namespace recoverkit {

struct CudaCopyDevice {
  // Retains the primary context of `ordinal` and creates the copy stream; throws CudaFailure.
  CudaCopyDevice(const CudaDriver& drv, int ordinal);
  ~CudaCopyDevice();
  CudaCopyDevice(const CudaCopyDevice&) = delete;
  CudaCopyDevice& operator=(const CudaCopyDevice&) = delete;

  // On the calling thread (context pushed and popped): records an event on `stream`
  // (0 = the legacy default stream) and returns it. Throws CudaFailure.
  CUevent record_producer(uintptr_t stream);

  // On a worker thread: makes the primary context current, waits on `producer`, copies
  // [src, src + n) to dst in chunks of chunk_bytes and, when crc_out is given, computes the
  // CRC-32C of each chunk as soon as it lands. Returns the producer event to the pool.
  // Throws CudaFailure (after draining the stream, so dst is no longer written).
  void copy_to_host(CUevent producer, void* dst, uintptr_t src, size_t n, size_t chunk_bytes,
                    uint32_t* crc_out);

  // Returns an event obtained from record_producer that will not be used (submit failed).
  void give_event(CUevent ev);

 private:
  CUevent take_event();  // a context must be current

  const CudaDriver& drv_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  CUstream stream_ = nullptr;
  std::mutex mu_;               // guards free_events_
  std::vector<CUevent> free_events_;
};

}  // namespace recoverkit
