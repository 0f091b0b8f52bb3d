// Error types of the native core. The core throws these; the bindings translate each one
// into the matching Python exception (see native/bindings/module.cc). Nothing in the core
// aborts the process or prints.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace recoverkit {

// A failed system call: becomes OSError(errno, strerror(errno), path), or
// OSError(errno, what) without a path. A non-empty `reason` replaces strerror(errno) in
// the Python exception (a refusal the kernel did not phrase: "is a FIFO, not a regular
// file").
class OsError : public std::runtime_error {
 public:
  OsError(int err, std::string path, const std::string& what, std::string reason = {})
      : std::runtime_error(what), err_(err), path_(std::move(path)), reason_(std::move(reason)) {}
  int err() const noexcept { return err_; }
  const std::string& path() const noexcept { return path_; }
  const std::string& reason() const noexcept { return reason_; }

 private:
  int err_;
  std::string path_;
  std::string reason_;
};

// Bytes read back are truncated or do not match their checksum: becomes IntegrityError.
class IntegrityFailure : public std::runtime_error {
 public:
  IntegrityFailure(std::string path, const std::string& what)
      : std::runtime_error(what), path_(std::move(path)) {}
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

// The staging pool has no free range large enough: becomes PoolExhaustedError.
class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A CUDA driver call failed (or there is no driver): becomes RuntimeError.
class CudaFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad arguments and use after close are std::invalid_argument, which pybind11 maps to
// ValueError.
using InvalidArgument = std::invalid_argument;

}  // namespace recoverkit
