// The copy engine: worker threads that copy (src, dst, nbytes) descriptors into host memory
// and compute the CRC-32C of what landed.
//
// Host sources are split into chunks of chunk_bytes. Workers claim chunks from the head of
// the queue, so the chunks of one large copy spread over every worker (a single 1 GiB copy
// runs on all threads). Each chunk is copied and checksummed in one pass (crc32c_copy:
// streaming stores while the CRC instruction reads the cached source lines), and its CRC is
// stored; the worker that finishes the last chunk combines the chunk CRCs in order with
// crc32c_combine (O(log n) each) and completes the job. Splitting one copy over all workers
// beats one-copy-per-worker because checkpoints are dominated by a few large tensors.
//
// Device sources (device >= 0) go through the CUDA driver: at submit an event is recorded
// on the producing stream; a worker makes the device's primary context current, has a
// dedicated per-device stream wait on that event, enqueues the device-to-host copy chunk by
// chunk and checksums each chunk on the host as soon as it lands (the DMA of the next chunks
// overlaps the CRC of this one).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "recoverkit/cuda_driver.h"

namespace recoverkit {

struct CudaCopyDevice;  // per-device CUDA resources (stream, event pool, primary context)

// One submitted copy; shared by the engine (while running) and the caller's handle.
class CopyJob {
 public:
  // Blocks until finished (success or failure) or timeout_s passes (< 0: no limit).
  // Returns whether it finished.
  bool wait(double timeout_s);
  bool done() const;
  bool failed() const;
  std::string error() const;  // empty while running or on success
  uint32_t crc() const;       // valid when done() and !failed()
  uint64_t nbytes() const noexcept { return nbytes_; }
  double elapsed_s() const;   // submit -> done (or -> now while running)

 private:
  friend class CopyEngine;
  using Clock = std::chrono::steady_clock;

  // Set once at submit.
  const uint8_t* src_ = nullptr;
  uint8_t* dst_ = nullptr;
  uint64_t nbytes_ = 0;
  bool want_crc_ = true;
  int device_ = -1;
  size_t chunk_bytes_ = 0;
  size_t nchunks_ = 0;  // work units: host chunks, or 1 for a device copy
  Clock::time_point t_submit_;
  CudaCopyDevice* cuda_ = nullptr;    // device copies only
  CUevent producer_event_ = nullptr;  // recorded on the producing stream at submit

  // Progress (next_ under the engine's queue lock; remaining_ counts unfinished units).
  size_t next_ = 0;
  std::atomic<size_t> remaining_{0};
  std::vector<uint32_t> chunk_crc_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::string error_;  // first failure; non-empty => failed
  uint32_t crc_ = 0;
  Clock::time_point t_done_;
};

struct CopyStats {
  uint64_t bytes_copied = 0, copies_done = 0, copies_failed = 0, copies_pending = 0;
};

class CopyEngine {
 public:
  CopyEngine(int num_threads, size_t chunk_bytes);  // throws InvalidArgument
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Queues a copy. Throws InvalidArgument for bad arguments or a closed engine, OsError(EFAULT)
  // when a page of a host range (dst, and src unless it is a device pointer) is not mapped
  // (see mem_check.h for what stays the caller's contract), and CudaFailure ("no CUDA
  // driver", or a failed event record) for device sources.
  std::shared_ptr<CopyJob> submit(uintptr_t src, uintptr_t dst, int64_t nbytes, bool crc,
                                  int device, uintptr_t stream);
  // Fails queued work with "engine closed", joins the workers, frees CUDA resources.
  void close();
  int num_threads() const noexcept { return num_threads_; }
  size_t chunk_bytes() const noexcept { return chunk_bytes_; }
  CopyStats stats() const;

 private:
  void worker_loop();
  void run_host_chunk(CopyJob& job, size_t chunk);
  void run_device_copy(CopyJob& job);
  void note_failure(CopyJob& job, const std::string& why);
  void finish_units(const std::shared_ptr<CopyJob>& job, size_t units);
  CudaCopyDevice& device(int ordinal);  // caller holds mu_; creates on first use

  const int num_threads_;
  const size_t chunk_bytes_;
  std::mutex close_mu_;  // serializes close()
  std::mutex mu_;        // guards queue_, closed_, devices_
  std::condition_variable cv_;
  std::deque<std::shared_ptr<CopyJob>> queue_;
  bool closed_ = false;
  std::vector<std::thread> workers_;
  std::vector<std::unique_ptr<CudaCopyDevice>> devices_;  // indexed by ordinal
  std::atomic<uint64_t> bytes_copied_{0}, copies_done_{0}, copies_failed_{0}, pending_{0};
};

}  // namespace recoverkit
