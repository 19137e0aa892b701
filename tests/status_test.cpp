#include <gtest/gtest.h>

#include "core/half.hpp"
#include "core/status.hpp"

namespace moeflux {
namespace {

Result<int> parse_positive(int v) {
  if (v <= 0) return make_error(ErrorCode::invalid_argument, "value {} is not positive", v);
  return v;
}

Status twice(int v, int* out) {
  MF_ASSIGN_OR_RETURN(int x, parse_positive(v));
  *out = 2 * x;
  return Status::ok();
}

TEST(Status, CarriesCodeAndMessageThroughMacros) {
  int out = 0;
  EXPECT_TRUE(twice(3, &out).is_ok());
  EXPECT_EQ(out, 6);
  const Status s = twice(-1, &out);
  EXPECT_EQ(s.code(), ErrorCode::invalid_argument);
  EXPECT_EQ(s.to_string(), "invalid argument: value -1 is not positive");
  EXPECT_EQ(s.with_context("flag --n").message(), "flag --n: value -1 is not positive");
}

TEST(Half, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_EQ(bf16_to_f32(0xc000), -2.0f);
}

TEST(Half, Fp16RoundTripsEveryValue) {
  // Every finite fp16 value converts to fp32 and back unchanged, subnormals included.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;  // inf / NaN
    ASSERT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h) << h;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds past the largest finite value
  EXPECT_EQ(f32_to_f16(1e-8f), 0x0000);
}

}  // namespace
}  // namespace moeflux
