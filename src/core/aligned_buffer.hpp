// An owned, aligned block of host memory (4 KiB by default, so O_DIRECT reads may target it).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace moeflux {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes, size_t alignment = 4096) { allocate(bytes, alignment); }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }

  // Returns false when the allocation fails (the caller turns that into a Status).
  bool allocate(size_t bytes, size_t alignment = 4096) {
    std::free(data_);
    data_ = nullptr;
    size_ = 0;
    if (bytes == 0) return true;
    const size_t rounded = (bytes + alignment - 1) / alignment * alignment;
    if (posix_memalign(&data_, alignment, rounded) != 0) {
      data_ = nullptr;
      return false;
    }
    size_ = bytes;
    return true;
  }

  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T> T* as() { return static_cast<T*>(data_); }
  template <typename T> const T* as() const { return static_cast<const T*>(data_); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

inline constexpr size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

}  // namespace moeflux
