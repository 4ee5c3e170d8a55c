// What the C++ tests share: counting checks, and comparing tensors bit for
// bit. Each test ends with `return report();`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>

namespace crelu_ext_test {

inline int passed = 0;
inline int failed = 0;

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::cerr << "FAILED: " << what << "\n";
  }
}

// Same sizes, dtype and bytes per element, except that NaNs (whose sign and
// payload are not specified) only need to be NaN in both.
inline bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.sizes() != b.sizes() ||
      a.scalar_type() != b.scalar_type()) {
    return false;
  }
  const at::Tensor ac = a.detach().contiguous(), bc = b.detach().contiguous();
  const at::Tensor nan = at::isnan(ac).contiguous();
  if (!at::equal(nan, at::isnan(bc))) return false;
  const auto* pa = static_cast<const char*>(ac.const_data_ptr());
  const auto* pb = static_cast<const char*>(bc.const_data_ptr());
  const bool* is_nan = nan.const_data_ptr<bool>();
  const int64_t size = ac.element_size();
  for (int64_t i = 0; i < ac.numel(); ++i) {
    if (!is_nan[i] && std::memcmp(pa + i * size, pb + i * size, size) != 0) {
      return false;
    }
  }
  return true;
}

// The closing line ctest shows, and the exit status.
inline int report() {
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}

}  // namespace crelu_ext_test
