// The defaults of Backend that fit every host-memory backend.
#include "backends/backend.hpp"

#include <cstring>

namespace moeflux {

void Backend::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(host_dst, src, bytes);
}

void Backend::copy_from_host(void* dst, const void* host_src, size_t bytes) {
  if (bytes) std::memcpy(dst, host_src, bytes);
}

}  // namespace moeflux
