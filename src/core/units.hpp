// Human-readable quantities for messages and reports.
#pragma once

#include <string>

namespace moeflux {

// "512 B", "1.50 KiB", "3.25 GiB" (powers of 1024).
std::string format_bytes(double bytes);

}  // namespace moeflux
