// Minimal NumPy .npy reader for float32 2-D arrays (the reference logits the parity scripts write).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace moeflux::test {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Empty shape on failure (a test then fails on its size check).
inline NpyArray read_npy_f32(const std::string& path) {
  NpyArray a;
  std::ifstream in(path, std::ios::binary);
  char magic[8];
  if (!in.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY") return a;
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16 = 0;
    in.read(reinterpret_cast<char*>(&len16), 2);
    header_len = len16;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (header.find("'<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos) return a;
  const auto open = header.find('(', header.find("'shape'"));
  const auto close = header.find(')', open);
  std::string dims = header.substr(open + 1, close - open - 1);
  size_t pos = 0;
  int64_t count = 1;
  while (pos < dims.size()) {
    size_t end = dims.find(',', pos);
    if (end == std::string::npos) end = dims.size();
    const std::string item = dims.substr(pos, end - pos);
    if (item.find_first_not_of(' ') != std::string::npos) {
      a.shape.push_back(std::stoll(item));
      count *= a.shape.back();
    }
    pos = end + 1;
  }
  a.data.resize(size_t(count));
  if (!in.read(reinterpret_cast<char*>(a.data.data()), std::streamsize(count * 4))) a.shape.clear();
  return a;
}

}  // namespace moeflux::test
