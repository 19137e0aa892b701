// The safetensors reader on valid files and on every kind of malformed header it must refuse.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/half.hpp"
#include "format/safetensors.hpp"
#include "test_checkpoint.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;
using test::TestTensor;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / fmt::format("moeflux_st_{}_{}", ::getpid(),
                                                    ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A file with a hand-written header, so malformed headers can be produced.
  std::string write_raw(const std::string& name, const std::string& header, size_t data_bytes, uint64_t header_len_override = 0) {
    const std::string p = path(name);
    std::ofstream out(p, std::ios::binary);
    const uint64_t n = header_len_override ? header_len_override : header.size();
    for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
    out << header << std::string(data_bytes, '\0');
    return p;
  }

  fs::path dir_;
};

TestTensor bf16_tensor(const std::string& name, std::vector<int64_t> shape, float start) {
  TestTensor t{name, "BF16", shape, {}};
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = f32_to_bf16(start + 0.25f * float(i));
    t.bytes.push_back(uint8_t(h & 0xff));
    t.bytes.push_back(uint8_t(h >> 8));
  }
  return t;
}

TEST_F(SafetensorsTest, ReadsTensorsAndConvertsEveryFloatDtype) {
  TestTensor f32{"b.f32", "F32", {3}, std::vector<uint8_t>(12)};
  const float f32_values[3] = {1.5f, -2.0f, 1e-20f};
  std::memcpy(f32.bytes.data(), f32_values, 12);
  TestTensor f16{"c.f16", "F16", {2}, {0x00, 0x3c, 0x00, 0xc0}};  // 1.0, -2.0
  TestTensor i64{"d.i64", "I64", {1}, std::vector<uint8_t>(8, 0)};
  ASSERT_TRUE(test::write_safetensors(path("m.safetensors"), {bf16_tensor("a.bf16", {2, 3}, -1.0f), f32, f16, i64}).is_ok());

  auto file = SafetensorsFile::open(path("m.safetensors"));
  ASSERT_TRUE(file.is_ok()) << file.status().to_string();
  ASSERT_EQ(file->tensors().size(), 4u);
  const SafetensorsTensor* a = file->find("a.bf16");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, SafetensorsDtype::bf16);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->elements(), 6);

  std::vector<float> out(6);
  ASSERT_TRUE(file->to_f32("a.bf16", out.data()).is_ok());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(out[size_t(i)], -1.0f + 0.25f * float(i));
  auto raw = file->raw("a.bf16");
  ASSERT_TRUE(raw.is_ok());
  EXPECT_EQ(std::vector<uint8_t>(raw->begin(), raw->end()), bf16_tensor("a.bf16", {2, 3}, -1.0f).bytes);
  ASSERT_TRUE(file->to_f32(*a, 4, 2, out.data()).is_ok());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], 0.25f);

  ASSERT_TRUE(file->to_f32("b.f32", out.data()).is_ok());
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[2], 1e-20f);
  ASSERT_TRUE(file->to_f32("c.f16", out.data()).is_ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);

  // Listed, but refused when read as float; the message names the tensor and the dtype.
  EXPECT_EQ(file->find("d.i64")->dtype, SafetensorsDtype::i64);
  const Status s = file->to_f32("d.i64", out.data());
  EXPECT_EQ(s.code(), ErrorCode::unsupported);
  EXPECT_NE(s.message().find("d.i64"), std::string::npos);
  EXPECT_NE(s.message().find("I64"), std::string::npos);

  EXPECT_EQ(file->to_f32("missing", out.data()).code(), ErrorCode::format);
}

// float8 e4m3fn as PyTorch defines it (torch.float8_e4m3fn): bias 7, no infinities, S.1111.111 NaN.
TEST_F(SafetensorsTest, DecodesFloat8E4M3) {
  EXPECT_EQ(f8_e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(f8_e4m3_to_f32(0x80)));        // −0
  EXPECT_EQ(f8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(f8_e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(f8_e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(f8_e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(f8_e4m3_to_f32(0x39), 1.125f);
  EXPECT_EQ(f8_e4m3_to_f32(0xc4), -3.0f);
  EXPECT_EQ(f8_e4m3_to_f32(0x78), 256.0f);  // exponent field 15 is a normal binade, not infinity
  EXPECT_EQ(f8_e4m3_to_f32(0x7e), 448.0f);  // the largest finite value
  EXPECT_EQ(f8_e4m3_to_f32(0xfe), -448.0f);
  EXPECT_TRUE(std::isnan(f8_e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8_e4m3_to_f32(0xff)));
  int nans = 0;
  for (int b = 0; b < 256; ++b) nans += f8_e4m3_is_nan(uint8_t(b)) ? 1 : 0;
  EXPECT_EQ(nans, 2);
  // Codes increase with magnitude: every positive code is above the one before.
  for (int b = 1; b < 0x7f; ++b) EXPECT_GT(f8_e4m3_to_f32(uint8_t(b)), f8_e4m3_to_f32(uint8_t(b - 1))) << b;

  TestTensor f8{"w.f8", "F8_E4M3", {2, 2}, {0x38, 0xc4, 0x7e, 0x01}};
  TestTensor e5{"w.e5m2", "F8_E5M2", {2}, {0x3c, 0x40}};
  ASSERT_TRUE(test::write_safetensors(path("f8.safetensors"), {f8, e5}).is_ok());
  auto file = SafetensorsFile::open(path("f8.safetensors"));
  ASSERT_TRUE(file.is_ok()) << file.status().to_string();
  EXPECT_EQ(file->find("w.f8")->dtype, SafetensorsDtype::f8_e4m3);
  EXPECT_EQ(file->find("w.e5m2")->dtype, SafetensorsDtype::f8_e5m2);
  std::vector<float> out(4);
  ASSERT_TRUE(file->to_f32("w.f8", out.data()).is_ok());  // the stored values; block scales are convert's
  EXPECT_EQ(out, (std::vector<float>{1.0f, -3.0f, 448.0f, std::ldexp(1.0f, -9)}));
  const Status s = file->to_f32("w.e5m2", out.data());  // known, not read
  EXPECT_EQ(s.code(), ErrorCode::unsupported);
  EXPECT_NE(s.message().find("F8_E5M2"), std::string::npos) << s.message();
}

// Expects open() to fail with a format error whose message contains every fragment.
void expect_format_error(const std::string& path, std::vector<std::string> fragments) {
  auto file = SafetensorsFile::open(path);
  ASSERT_FALSE(file.is_ok()) << path;
  EXPECT_EQ(file.status().code(), ErrorCode::format) << file.status().to_string();
  fragments.push_back(path);
  for (const auto& f : fragments) EXPECT_NE(file.status().message().find(f), std::string::npos) << f << " not in: " << file.status().message();
}

TEST_F(SafetensorsTest, RefusesTruncatedFiles) {
  ASSERT_TRUE(test::write_safetensors(path("t.safetensors"), {bf16_tensor("x", {4}, 0), bf16_tensor("w.last", {8, 4}, 0)}).is_ok());
  fs::resize_file(path("t.safetensors"), fs::file_size(path("t.safetensors")) - 3);
  expect_format_error(path("t.safetensors"), {"w.last", "past the data section"});

  std::ofstream(path("short.safetensors")) << "abc";
  expect_format_error(path("short.safetensors"), {"too short"});
}

TEST_F(SafetensorsTest, RefusesCorruptHeaders) {
  expect_format_error(write_raw("json.safetensors", R"({"x": {"dtype": "BF16", "shape": [2], )", 4), {"not valid JSON"});
  expect_format_error(write_raw("len.safetensors", R"({})", 4, 1000), {"header length 1000"});
  expect_format_error(write_raw("huge.safetensors", R"({})", 4, 1ull << 60), {"header length"});
  expect_format_error(write_raw("past.safetensors", R"({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}})", 6),
                      {"tensor x", "[0, 8]", "past the data section"});
  expect_format_error(write_raw("count.safetensors", R"({"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})", 12),
                      {"tensor x", "10 bytes, expected 12", "[2, 3]"});
  expect_format_error(write_raw("order.safetensors", R"({"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 12),
                      {"tensor x", "out of order"});
  expect_format_error(write_raw("dtype.safetensors", R"({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}})", 1),
                      {"tensor x", "unknown dtype \"Q7\""});
  expect_format_error(write_raw("shape.safetensors", R"({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}})", 1),
                      {"tensor x", "shape"});
  expect_format_error(write_raw("noshape.safetensors", R"({"x": {"dtype": "U8", "data_offsets": [0, 1]}})", 1), {"tensor x", "shape"});
  expect_format_error(write_raw("array.safetensors", R"([1, 2])", 1), {"not a JSON object"});
  expect_format_error(
      write_raw("overlap.safetensors",
                R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})", 6),
      {"overlap", "a", "b"});
}

TEST_F(SafetensorsTest, ScansShardsFromIndexOrDirectory) {
  ASSERT_TRUE(test::write_safetensors(path("s1.safetensors"), {bf16_tensor("a", {2}, 0), bf16_tensor("b", {2}, 0)}).is_ok());
  ASSERT_TRUE(test::write_safetensors(path("s2.safetensors"), {bf16_tensor("c", {3}, 0)}).is_ok());
  auto index = scan_checkpoint_dir(dir_.string());
  ASSERT_TRUE(index.is_ok()) << index.status().to_string();
  EXPECT_EQ(index->shards.size(), 2u);
  EXPECT_EQ(index->tensor_count(), 3u);
  EXPECT_EQ(index->tensor_bytes, 14u);
  ASSERT_NE(index->find("c"), nullptr);
  EXPECT_EQ(index->tensor_shard.at("c"), 1u);

  // With an index, only the shards it names are read.
  std::ofstream(path("model.safetensors.index.json")) << R"({"weight_map": {"c": "s2.safetensors"}})";
  index = scan_checkpoint_dir(dir_.string());
  ASSERT_TRUE(index.is_ok()) << index.status().to_string();
  EXPECT_EQ(index->shards.size(), 1u);

  std::ofstream(path("model.safetensors.index.json")) << R"({"weight_map": {"c": "s1.safetensors"}})";
  index = scan_checkpoint_dir(dir_.string());
  ASSERT_FALSE(index.is_ok());
  EXPECT_NE(index.status().message().find("tensor c"), std::string::npos) << index.status().message();

  std::ofstream(path("model.safetensors.index.json")) << R"({"weights": {}})";
  EXPECT_EQ(scan_checkpoint_dir(dir_.string()).status().code(), ErrorCode::format);
}

TEST_F(SafetensorsTest, RefusesATensorInTwoShards) {
  ASSERT_TRUE(test::write_safetensors(path("s1.safetensors"), {bf16_tensor("a", {2}, 0), bf16_tensor("dup", {2}, 0)}).is_ok());
  ASSERT_TRUE(test::write_safetensors(path("s2.safetensors"), {bf16_tensor("dup", {2}, 0)}).is_ok());
  auto index = scan_checkpoint_dir(dir_.string());
  ASSERT_FALSE(index.is_ok());
  EXPECT_EQ(index.status().code(), ErrorCode::format);
  for (const char* f : {"dup", "s1.safetensors", "s2.safetensors"})
    EXPECT_NE(index.status().message().find(f), std::string::npos) << index.status().message();
}

TEST_F(SafetensorsTest, RefusesAnEmptyDirectory) {
  auto index = scan_checkpoint_dir(dir_.string());
  EXPECT_EQ(index.status().code(), ErrorCode::format);
  EXPECT_EQ(scan_checkpoint_dir(path("nope")).status().code(), ErrorCode::io);
}

}  // namespace
}  // namespace moeflux
