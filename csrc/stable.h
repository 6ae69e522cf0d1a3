// The one place ffa's C++ meets torch: the LibTorch stable ABI (torch/csrc/stable,
// torch/headeronly) at the API level of TORCH_TARGET_VERSION (torch 2.10, set by CMakeLists.txt),
// plus the small helpers the wrappers share (checks, dtype dispatch, formatting). Nothing here may
// use ATen or c10 C++ symbols: the built modules must import under every torch from 2.10 on
// (tools/check_abi.py audits their undefined symbols).
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace ffa {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

namespace detail {
inline std::ostream& put(std::ostream& os, ScalarType t) {
  return os << torch::headeronly::toString(t);
}
inline std::ostream& put(std::ostream& os, IntArrayRef v) {
  os << '[';
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  return os << ']';
}
inline std::ostream& put(std::ostream& os, const Device& d) {
  switch (d.type()) {
    case DeviceType::CPU:
      os << "cpu";
      break;
    case DeviceType::CUDA:
      os << "cuda";
      break;
    case DeviceType::Meta:
      os << "meta";
      break;
    default:
      os << "device type " << static_cast<int>(d.type());
  }
  if (d.index() >= 0) os << ':' << static_cast<int>(d.index());
  return os;
}
inline std::ostream& put(std::ostream& os, bool b) { return os << (b ? "true" : "false"); }
template <typename T>
std::ostream& put(std::ostream& os, const T& v) {
  return os << v;
}
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (put(os, args), ...);
  return os.str();
}
}  // namespace detail

// Errors: the message alone (as TORCH_CHECK showed it), no file/line prefix. Through the stable
// boxed-kernel boundary every C++ exception reaches Python as a RuntimeError, and the stable ABI
// has no TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: those checks tag their message ("[ffa:ValueError] ",
// "[ffa:TypeError] ") and ffa's Python Autograd kernel of each op (ffa/_autograd.py), which every
// call outside inference mode passes, re-raises them as ValueError / TypeError.
#define FFA_CHECK_TAGGED(cond, tag, ...)                                         \
  do {                                                                           \
    if (!(cond)) throw std::runtime_error(::ffa::detail::str(tag, __VA_ARGS__)); \
  } while (0)
#define FFA_CHECK(cond, ...) FFA_CHECK_TAGGED(cond, "", __VA_ARGS__)
#define FFA_CHECK_VALUE(cond, ...) FFA_CHECK_TAGGED(cond, "[ffa:ValueError] ", __VA_ARGS__)
#define FFA_CHECK_TYPE(cond, ...) FFA_CHECK_TAGGED(cond, "[ffa:TypeError] ", __VA_ARGS__)

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

inline bool is_complex(ScalarType t) {
  return t == ScalarType::ComplexHalf || t == ScalarType::ComplexFloat ||
         t == ScalarType::ComplexDouble;
}

// The accumulation type of a CPU kernel (at::opmath_type): float for the half types.
template <typename T>
using opmath_t =
    std::conditional_t<std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>, float, T>;

template <typename T>
constexpr ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<T, float>)
    return ScalarType::Float;
  else if constexpr (std::is_same_v<T, double>)
    return ScalarType::Double;
  else if constexpr (std::is_same_v<T, Half>)
    return ScalarType::Half;
  else
    return ScalarType::BFloat16;
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- dtype dispatch (the lambda's text is expanded in each case, so it sees scalar_t) -----------
#define FFA_DISPATCH_CASE(enum_value, type, ...) \
  case ::ffa::ScalarType::enum_value: {          \
    using scalar_t = type;                       \
    return __VA_ARGS__();                        \
  }

#define FFA_DISPATCH_DEFAULT(dtype, name) \
  default:                                \
    throw std::runtime_error(::ffa::detail::str('"', name, "\" not implemented for '", dtype, "'"));

// float32, float64
#define FFA_DISPATCH_FLOATING_TYPES(dtype, name, ...) \
  [&] {                                               \
    const ::ffa::ScalarType _ffa_st = (dtype);        \
    switch (_ffa_st) {                                \
      FFA_DISPATCH_CASE(Double, double, __VA_ARGS__)  \
      FFA_DISPATCH_CASE(Float, float, __VA_ARGS__)    \
      FFA_DISPATCH_DEFAULT(_ffa_st, name)             \
    }                                                 \
  }()

// float32, float64, float16, bfloat16
#define FFA_DISPATCH_FLOATING_AND_HALF_TYPES(dtype, name, ...)  \
  [&] {                                                         \
    const ::ffa::ScalarType _ffa_st = (dtype);                  \
    switch (_ffa_st) {                                          \
      FFA_DISPATCH_CASE(Double, double, __VA_ARGS__)            \
      FFA_DISPATCH_CASE(Float, float, __VA_ARGS__)              \
      FFA_DISPATCH_CASE(Half, ::ffa::Half, __VA_ARGS__)         \
      FFA_DISPATCH_CASE(BFloat16, ::ffa::BFloat16, __VA_ARGS__) \
      FFA_DISPATCH_DEFAULT(_ffa_st, name)                       \
    }                                                           \
  }()

// Integer and floating types (AT_DISPATCH_ALL_TYPES_AND2(kHalf, kBFloat16, ...)).
#define FFA_DISPATCH_ALL_TYPES_AND_HALF(dtype, name, ...)       \
  [&] {                                                         \
    const ::ffa::ScalarType _ffa_st = (dtype);                  \
    switch (_ffa_st) {                                          \
      FFA_DISPATCH_CASE(Byte, uint8_t, __VA_ARGS__)             \
      FFA_DISPATCH_CASE(Char, int8_t, __VA_ARGS__)              \
      FFA_DISPATCH_CASE(Short, int16_t, __VA_ARGS__)            \
      FFA_DISPATCH_CASE(Int, int32_t, __VA_ARGS__)              \
      FFA_DISPATCH_CASE(Long, int64_t, __VA_ARGS__)             \
      FFA_DISPATCH_CASE(Double, double, __VA_ARGS__)            \
      FFA_DISPATCH_CASE(Float, float, __VA_ARGS__)              \
      FFA_DISPATCH_CASE(Half, ::ffa::Half, __VA_ARGS__)         \
      FFA_DISPATCH_CASE(BFloat16, ::ffa::BFloat16, __VA_ARGS__) \
      FFA_DISPATCH_DEFAULT(_ffa_st, name)                       \
    }                                                           \
  }()

// ---- tensor plumbing -------------------------------------------------------------------------

// A new uninitialized tensor of the given sizes on like's device (dtype: like's unless given).
inline Tensor empty_on(IntArrayRef sizes, const Tensor& like) {
  return torch::stable::new_empty(like, sizes);
}
inline Tensor empty_on(IntArrayRef sizes, const Tensor& like, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}

inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

inline Tensor zeros_like(const Tensor& t) {
  Tensor z = torch::stable::empty_like(t);
  torch::stable::zero_(z);
  return z;
}

}  // namespace ffa
