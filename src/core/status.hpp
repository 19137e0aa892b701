// Typed errors for everything a user can cause, and MF_CHECK for broken invariants.
// Owns: Status, Result<T>, the MF_TRY / MF_ASSIGN_OR_RETURN macros. Does not own logging.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace moeflux {

// Stable numbering: these values cross the C API (moeflux_status in moeflux.h).
enum class ErrorCode : int {
  ok = 0,
  invalid_argument = 1,  // a bad flag, token id, shape requested by the caller
  io = 2,                // open/read/write/rename failed, short read
  format = 3,            // malformed file: bad header, truncated, hash mismatch
  unsupported = 4,       // valid input we do not handle (unknown model_type, dtype)
  mismatch = 5,          // input that contradicts another (state of another model, wrong shape)
  out_of_memory = 6,     // an allocation or budget could not be met
  internal = 7,          // a bug surfaced as an error rather than an abort
};

const char* error_code_name(ErrorCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }
  bool is_ok() const { return code_ == ErrorCode::ok; }
  explicit operator bool() const { return is_ok(); }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "format: tensor x: shape [1,2], expected [2,2]"
  std::string to_string() const;

  // Prefixes the message with context ("reading shard a.safetensors: ...").
  Status with_context(const std::string& context) const {
    if (is_ok()) return *this;
    return {code_, context + ": " + message_};
  }

 private:
  ErrorCode code_ = ErrorCode::ok;
  std::string message_;
};

template <typename... Args>
Status make_error(ErrorCode code, fmt::format_string<Args...> f, Args&&... args) {
  return Status(code, fmt::format(f, std::forward<Args>(args)...));
}

// Either a value or a non-ok Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).is_ok()) v_ = Status(ErrorCode::internal, "Result built from an ok Status");
  }

  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }
  const Status& status() const {
    static const Status ok_status;
    return is_ok() ? ok_status : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

[[noreturn]] void check_failed(const char* file, int line, const char* statement, const std::string& detail);

}  // namespace moeflux

// Broken invariants and driver failures: abort with file, line and statement.
#define MF_CHECK(cond)                                                       \
  do {                                                                       \
    if (!(cond)) ::moeflux::check_failed(__FILE__, __LINE__, #cond, "");     \
  } while (0)
#define MF_CHECK_MSG(cond, ...)                                                                 \
  do {                                                                                          \
    if (!(cond)) ::moeflux::check_failed(__FILE__, __LINE__, #cond, fmt::format(__VA_ARGS__)); \
  } while (0)

#define MF_CONCAT_INNER(a, b) a##b
#define MF_CONCAT(a, b) MF_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function if expr is not ok.
#define MF_TRY(expr)                                      \
  do {                                                    \
    ::moeflux::Status mf_status_ = (expr);                \
    if (!mf_status_.is_ok()) return mf_status_;           \
  } while (0)

#define MF_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.is_ok()) return tmp.status();         \
  lhs = std::move(tmp).value()

// MF_ASSIGN_OR_RETURN(auto x, make_x()); declares x or returns the error.
#define MF_ASSIGN_OR_RETURN(lhs, expr) MF_ASSIGN_OR_RETURN_IMPL(MF_CONCAT(mf_result_, __LINE__), lhs, expr)
