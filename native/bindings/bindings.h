// Shared helpers of the pybind11 bindings (the only code that sees Python).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace rkpy {

namespace py = pybind11;

void bind_crc(py::module_& m);
void bind_pool(py::module_& m);
void bind_copy(py::module_& m);
void bind_segment(py::module_& m);

// Raises the given Python exception instance (set_error only sets it, for translators).
[[noreturn]] void raise(const py::object& exc);
void set_error(const py::object& exc);

// An exception class from recoverkit.errors (imported on first use).
py::object error_class(const char* name);

// A path-like object as the file system's bytes (os.fsencode), and back for messages.
// ValueError for a path with a NUL byte (C would silently cut the path there).
std::string fs_path(const py::handle& path);
py::object fs_decode(const std::string& path);

// An integer argument (anything with __index__; TypeError otherwise) as int64;
// OverflowError naming the argument when it does not fit.
int64_t int_arg(const py::handle& v, const char* name);
// A non-negative integer argument (pointer, size, offset); ValueError names it otherwise.
int64_t non_negative(int64_t v, const char* name);
int64_t size_arg(const py::handle& v, const char* name);
// A CRC-32C value: an integer in [0, 2**32), ValueError for any other integer.
uint32_t crc_arg(const py::handle& v, const char* name);
// The same test without raising for a value out of range: false then (TypeError still
// raises for a non-integer).
bool crc_value(const py::handle& v, uint32_t& out);

}  // namespace rkpy
