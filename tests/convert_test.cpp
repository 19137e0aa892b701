// moeflux convert end to end: tiny checkpoints → pack → Pack::open, compared with the source bytes and
// values; every kind of bad checkpoint and damaged pack refused with a clear error; the CLI's exit codes.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "core/half.hpp"
#include "format/convert.hpp"
#include "format/pack.hpp"
#include "format/safetensors.hpp"
#include "quant/quantize.hpp"
#include "test_checkpoint.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::TinyCheckpoint;
using test::TinyCheckpointOptions;

std::vector<uint8_t> read_bytes(const std::string& path, uint64_t offset = 0, uint64_t bytes = UINT64_MAX) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(std::streamoff(offset));
  std::vector<uint8_t> out;
  if (bytes == UINT64_MAX) {
    out.assign(std::istreambuf_iterator<char>(in), {});
  } else {
    out.resize(bytes);
    in.read(reinterpret_cast<char*>(out.data()), std::streamsize(bytes));
  }
  return out;
}

std::vector<float> bf16_values(const test::TestTensor& t) {
  std::vector<float> v(t.bytes.size() / 2);
  for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(uint16_t(t.bytes[2 * i] | t.bytes[2 * i + 1] << 8));
  return v;
}

// Rewrites a safetensors file's header through fn, keeping the data section byte for byte.
void edit_header(const std::string& path, const std::function<void(json&)>& fn) {
  std::vector<uint8_t> bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | bytes[size_t(i)];
  json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + long(n));
  fn(header);
  const std::string text = header.dump();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (int i = 0; i < 8; ++i) out.put(char((uint64_t(text.size()) >> (8 * i)) & 0xff));
  out << text;
  out.write(reinterpret_cast<const char*>(bytes.data() + 8 + n), std::streamsize(bytes.size() - 8 - n));
}

void expect_error(const Status& s, ErrorCode code, const std::vector<std::string>& fragments) {
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.code(), code) << s.to_string();
  for (const auto& f : fragments) EXPECT_NE(s.message().find(f), std::string::npos) << "\"" << f << "\" not in: " << s.message();
}

class ConvertTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("moeflux_cv_{}_{}", ::getpid(), ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  TinyCheckpoint make(const std::string& name, const TinyCheckpointOptions& o = {}) {
    auto ck = test::make_tiny_qwen3_moe_checkpoint(path(name), o);
    EXPECT_TRUE(ck.is_ok()) << ck.status().to_string();
    return ck.is_ok() ? std::move(ck).value() : TinyCheckpoint{};
  }

  Status convert(const std::string& hf, const std::string& pack, WeightFormat experts = WeightFormat::bf16,
                 WeightFormat dense = WeightFormat::bf16, bool overwrite = false, ConvertSummary* summary = nullptr) {
    ConvertOptions o;
    o.hf_dir = path(hf);
    o.pack_dir = path(pack);
    o.expert_format = experts;
    o.dense_format = dense;
    o.overwrite = overwrite;
    o.progress = false;
    return convert_checkpoint(o, summary);
  }

  // A conversion that must fail leaves neither the pack nor its partial directory.
  void expect_convert_error(const std::string& hf, ErrorCode code, const std::vector<std::string>& fragments,
                            WeightFormat experts = WeightFormat::bf16) {
    expect_error(convert(hf, "bad_pack", experts), code, fragments);
    EXPECT_FALSE(fs::exists(path("bad_pack")));
    EXPECT_FALSE(fs::exists(path("bad_pack.partial")));
  }

  std::vector<uint8_t> expert_blob(const Pack& pack, int layer, int64_t expert) const {
    const Manifest& m = pack.manifest();
    return read_bytes(pack.expert_file_path(layer), uint64_t(expert) * m.expert_stride, m.expert_bytes);
  }

  fs::path dir_;
};

std::unique_ptr<Pack> open_pack(const std::string& dir) {
  auto pack = Pack::open(dir);
  EXPECT_TRUE(pack.is_ok()) << pack.status().to_string();
  return pack.is_ok() ? std::move(pack).value() : nullptr;
}

TEST_F(ConvertTest, Bf16RoundTripKeepsEveryByte) {
  const TinyCheckpoint ck = make("hf");
  std::ofstream(path("hf/tokenizer.json")) << R"({"model": {}})";
  ConvertSummary summary;
  ASSERT_TRUE(convert("hf", "pack", WeightFormat::bf16, WeightFormat::bf16, false, &summary).is_ok());
  EXPECT_FALSE(fs::exists(path("pack.partial")));
  auto pack = open_pack(path("pack"));
  ASSERT_NE(pack, nullptr);
  const Manifest& m = pack->manifest();
  EXPECT_EQ(m.model_type, "qwen3_moe");
  EXPECT_EQ(m.n_expert, 8);
  ASSERT_EQ(m.expert_layers.size(), 3u);
  EXPECT_EQ(m.expert_stride % pack_alignment, 0u);
  EXPECT_EQ(m.expert_bytes, 3u * 64 * 64 * 2);
  EXPECT_EQ(summary.expert_stride, m.expert_stride);
  EXPECT_EQ(summary.resident_bytes, pack->resident_bytes());
  EXPECT_EQ(summary.tokenizer_files, std::vector<std::string>{"tokenizer.json"});
  EXPECT_EQ(m.tokenizer_files, std::vector<std::string>{"tokenizer.json"});
  EXPECT_TRUE(fs::exists(path("pack/tokenizer/tokenizer.json")));
  EXPECT_TRUE(summary.extra_tensors.empty());

  size_t resident = 0, expert_matrices = 0;
  for (const auto& t : ck.tensors) {
    const std::string experts_marker = ".mlp.experts.";
    const auto pos = t.name.find(experts_marker);
    if (pos == std::string::npos) {
      ++resident;
      auto view = pack->resident(t.name, t.shape);
      ASSERT_TRUE(view.is_ok()) << view.status().to_string();
      if (t.shape.size() == 1) {  // norms: f32, exactly the bf16 values
        ASSERT_EQ(view->format, WeightFormat::f32) << t.name;
        const std::vector<float> expected = bf16_values(t);
        EXPECT_EQ(std::memcmp(view->data, expected.data(), expected.size() * 4), 0) << t.name;
      } else {
        ASSERT_EQ(view->format, WeightFormat::bf16) << t.name;
        EXPECT_EQ(std::memcmp(view->data, t.bytes.data(), t.bytes.size()), 0) << t.name;
      }
      continue;
    }
    // model.layers.L.mlp.experts.E.part.weight
    ++expert_matrices;
    const int layer = std::stoi(t.name.substr(std::string("model.layers.").size()));
    const std::string rest = t.name.substr(pos + experts_marker.size());
    const int64_t e = std::stoll(rest);
    const std::string part = rest.substr(rest.find('.') + 1, rest.rfind('.') - rest.find('.') - 1);
    const std::vector<uint8_t> blob = expert_blob(*pack, layer, e);
    size_t index = 0;
    while (index < m.expert_matrices.size() && m.expert_matrices[index].part != part) ++index;
    ASSERT_LT(index, m.expert_matrices.size()) << part;
    const WeightView v = pack->expert_view(blob.data(), index);
    EXPECT_EQ(v.rows, t.shape[0]);
    EXPECT_EQ(v.cols, t.shape[1]);
    EXPECT_EQ(std::memcmp(v.data, t.bytes.data(), t.bytes.size()), 0) << t.name;
  }
  EXPECT_EQ(m.tensors.size(), resident);
  EXPECT_EQ(expert_matrices, 3u * 8 * 3);
  EXPECT_EQ(summary.checkpoint_tensors, resident + expert_matrices);
}

TEST_F(ConvertTest, FusedPerExpertAndShardedCheckpointsGiveIdenticalPacks) {
  TinyCheckpointOptions o;
  o.seed = 7;
  make("per_expert", o);
  o.fused_experts = true;
  make("fused", o);
  o.fused_experts = false;
  o.n_shards = 4;  // with ~100 tensors, some experts straddle shards
  make("sharded", o);
  ASSERT_TRUE(fs::exists(path("sharded/model.safetensors.index.json")));
  for (const char* name : {"per_expert", "fused", "sharded"}) {
    const Status s = convert(name, std::string(name) + "_pack", WeightFormat::q8);
    ASSERT_TRUE(s.is_ok()) << name << ": " << s.to_string();
  }
  for (const char* name : {"fused_pack", "sharded_pack"}) {
    for (const char* file : {"resident.bin", "experts/layer_000.bin", "experts/layer_001.bin", "experts/layer_002.bin"})
      EXPECT_EQ(read_bytes(path(std::string(name) + "/" + file)), read_bytes(path(std::string("per_expert_pack/") + file)))
          << name << " " << file;
  }
}

TEST_F(ConvertTest, TransformersFixtureLayoutsGiveIdenticalExperts) {
  // The same model saved by transformers per expert and fused (tests/fixtures/parity).
  const std::string fixtures = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/";
  if (!fs::exists(fixtures + "tied_dense_gqa_other_layout")) GTEST_SKIP() << "no parity fixtures";
  for (const char* name : {"tied_dense_gqa", "tied_dense_gqa_other_layout"}) {
    ConvertOptions o;
    o.hf_dir = fixtures + name;
    o.pack_dir = path(name);
    o.progress = false;
    const Status s = convert_checkpoint(o);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }
  auto a = open_pack(path("tied_dense_gqa"));
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->manifest().find_tensor("lm_head.weight"), nullptr);  // tied: the embedding is the head
  ASSERT_FALSE(a->manifest().expert_layers.empty());
  for (const auto& l : a->manifest().expert_layers)
    EXPECT_EQ(read_bytes(path("tied_dense_gqa/" + l.file)), read_bytes(path("tied_dense_gqa_other_layout/" + l.file))) << l.file;
}

// Checks a quantized matrix against its source: every group within the format's rounding bound.
void expect_within_quant_bound(const WeightView& v, const std::vector<float>& source, const std::string& what) {
  ASSERT_EQ(size_t(v.rows * v.cols), source.size()) << what;
  const int64_t group = weight_format_group(v.format);
  std::vector<float> row(size_t(v.cols));
  double worst = 0;
  for (int64_t r = 0; r < v.rows; ++r) {
    dequantize_row(v, r, row.data());
    for (int64_t g0 = 0; g0 < v.cols; g0 += group) {
      const float* src = source.data() + r * v.cols + g0;
      float lo = src[0], hi = src[0], amax = 0;
      for (int64_t i = 0; i < group; ++i) {
        lo = std::min(lo, src[i]);
        hi = std::max(hi, src[i]);
        amax = std::max(amax, std::fabs(src[i]));
      }
      // Half a quantization step, plus the rounding of the fp16 (q8) or bf16 (q4) scale and bias.
      const float bound = v.format == WeightFormat::q8 ? 0.5f * amax / 127.0f * (1 + 1e-3f) + 1e-7f
                                                       : (hi - lo) / 30.0f * 1.01f + (std::fabs(lo) + (hi - lo)) / 256.0f + 1e-7f;
      for (int64_t i = 0; i < group; ++i) {
        const float err = std::fabs(row[size_t(g0 + i)] - src[i]);
        worst = std::max(worst, double(err / bound));
        ASSERT_LE(err, bound) << what << " row " << r << " col " << g0 + i;
      }
    }
  }
  // The bound is not vacuous: errors use a good part of it (a format mix-up would blow through it).
  EXPECT_GT(worst, 0.3) << what;
}

TEST_F(ConvertTest, QuantizedPacksStayWithinTheQuantizationBound) {
  const TinyCheckpoint ck = make("hf");
  for (WeightFormat f : {WeightFormat::q8, WeightFormat::q4}) {
    const std::string pack_dir = fmt::format("pack_{}", weight_format_name(f));
    ASSERT_TRUE(convert("hf", pack_dir, f, f).is_ok());
    auto pack = open_pack(path(pack_dir));
    ASSERT_NE(pack, nullptr);
    EXPECT_EQ(pack->manifest().expert_format, f);
    for (const char* name : {"model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight", "lm_head.weight"}) {
      auto v = pack->resident(name);
      ASSERT_TRUE(v.is_ok());
      EXPECT_EQ(v->format, f) << name;
      expect_within_quant_bound(*v, bf16_values(*ck.find(name)), name);
    }
    auto router = pack->resident("model.layers.0.mlp.gate.weight");
    ASSERT_TRUE(router.is_ok());
    EXPECT_EQ(router->format, WeightFormat::bf16);  // routers never quantized
    const std::vector<uint8_t> blob = expert_blob(*pack, 2, 5);
    const char* parts[] = {"gate_proj", "up_proj", "down_proj"};
    for (size_t i = 0; i < 3; ++i) {
      const std::string name = fmt::format("model.layers.2.mlp.experts.5.{}.weight", parts[i]);
      expect_within_quant_bound(pack->expert_view(blob.data(), i), bf16_values(*ck.find(name)), name);
    }
  }
}

TEST_F(ConvertTest, DenseMatricesThatDoNotFitFallBackToBf16) {
  TinyCheckpointOptions o;
  o.mlp_only_layers = {1};
  o.intermediate = 96;  // down_proj [64, 96]: 96 is not a multiple of q4's 64
  make("hf", o);
  ConvertSummary summary;
  ASSERT_TRUE(convert("hf", "pack", WeightFormat::q4, WeightFormat::q4, false, &summary).is_ok());
  EXPECT_EQ(summary.fallback_tensors, std::vector<std::string>{"model.layers.1.mlp.down_proj.weight"});
  auto pack = open_pack(path("pack"));
  ASSERT_NE(pack, nullptr);
  EXPECT_EQ(pack->resident("model.layers.1.mlp.down_proj.weight")->format, WeightFormat::bf16);
  EXPECT_EQ(pack->resident("model.layers.1.mlp.up_proj.weight")->format, WeightFormat::q4);
  EXPECT_EQ(pack->manifest().expert_layers.size(), 2u);
}

TEST_F(ConvertTest, ExpertsThatDoNotFitTheFormatAreRefused) {
  TinyCheckpointOptions o;
  o.hidden = 96;  // gate_proj/up_proj [64, 96]
  make("hf", o);
  expect_convert_error("hf", ErrorCode::unsupported, {"gate_proj", "[64, 96]", "q4", "64"}, WeightFormat::q4);
  EXPECT_TRUE(convert("hf", "pack_q8", WeightFormat::q8).is_ok());
}

TEST_F(ConvertTest, TiedEmbeddingsAndExtraTensors) {
  TinyCheckpointOptions o;
  o.tied = true;
  make("hf", o);
  test::TestTensor extra{"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {16}, std::vector<uint8_t>(64)};
  ASSERT_TRUE(test::write_safetensors(path("hf/extra.safetensors"), {extra}).is_ok());
  ConvertSummary summary;
  ASSERT_TRUE(convert("hf", "pack", WeightFormat::bf16, WeightFormat::bf16, false, &summary).is_ok());
  EXPECT_EQ(summary.extra_tensors, std::vector<std::string>{extra.name});
  auto pack = open_pack(path("pack"));
  ASSERT_NE(pack, nullptr);
  EXPECT_EQ(pack->manifest().find_tensor("lm_head.weight"), nullptr);
  EXPECT_EQ(pack->manifest().find_tensor(extra.name), nullptr);
}

TEST_F(ConvertTest, RefusesDamagedSafetensors) {
  make("truncated");
  fs::resize_file(path("truncated/model.safetensors"), fs::file_size(path("truncated/model.safetensors")) - 10);
  expect_convert_error("truncated", ErrorCode::format, {"model.safetensors", "lm_head.weight", "past the data section"});

  make("bad_json");
  {
    std::fstream f(path("bad_json/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8);
    f << "#!%";
  }
  expect_convert_error("bad_json", ErrorCode::format, {"model.safetensors", "not valid JSON"});

  make("long_header");
  {
    std::fstream f(path("long_header/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4);
    f.put(1);  // header length + 2^32
  }
  expect_convert_error("long_header", ErrorCode::format, {"model.safetensors", "header length"});

  make("offsets");
  edit_header(path("offsets/model.safetensors"), [](json& h) { h["model.norm.weight"]["data_offsets"][1] = 1ull << 40; });
  expect_convert_error("offsets", ErrorCode::format, {"model.norm.weight", "past the data section"});

  make("byte_count");
  edit_header(path("byte_count/model.safetensors"), [](json& h) { h["model.layers.2.self_attn.k_proj.weight"]["shape"] = {64, 65}; });
  expect_convert_error("byte_count", ErrorCode::format, {"model.layers.2.self_attn.k_proj.weight", "expected 8320"});

  make("dtype");
  edit_header(path("dtype/model.safetensors"), [](json& h) { h["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "I16"; });
  expect_convert_error("dtype", ErrorCode::unsupported, {"model.layers.0.self_attn.q_proj.weight", "I16"});
}

TEST_F(ConvertTest, RefusesCheckpointsThatContradictTheConfig) {
  make("missing");
  edit_header(path("missing/model.safetensors"), [](json& h) { h.erase("model.layers.1.self_attn.k_norm.weight"); });
  expect_convert_error("missing", ErrorCode::format, {"model.layers.1.self_attn.k_norm.weight", "missing", "1 declared tensor"});

  make("missing_expert");
  edit_header(path("missing_expert/model.safetensors"), [](json& h) {
    h.erase("model.layers.2.mlp.experts.5.up_proj.weight");
    h.erase("model.layers.2.mlp.experts.6.up_proj.weight");
  });
  expect_convert_error("missing_expert", ErrorCode::format, {"model.layers.2.mlp.experts.5.up_proj.weight", "2 declared tensors"});

  make("shape");
  edit_header(path("shape/model.safetensors"), [](json& h) { h["model.layers.0.self_attn.q_proj.weight"]["shape"] = {64, 128}; });
  expect_convert_error("shape", ErrorCode::mismatch, {"model.layers.0.self_attn.q_proj.weight", "[64, 128]", "expected [128, 64]"});

  TinyCheckpointOptions fused;
  fused.fused_experts = true;
  make("fused_shape", fused);
  edit_header(path("fused_shape/model.safetensors"), [](json& h) { h["model.layers.1.mlp.experts.down_proj"]["shape"] = {8, 32, 128}; });
  expect_convert_error("fused_shape", ErrorCode::mismatch, {"model.layers.1.mlp.experts.down_proj", "expected [8, 64, 64]"});

  make("unknown_type");
  {
    json config = json::parse(read_bytes(path("unknown_type/config.json")));
    config["model_type"] = "llama4_moe";
    std::ofstream(path("unknown_type/config.json")) << config.dump();
  }
  expect_convert_error("unknown_type", ErrorCode::unsupported, {"llama4_moe", "qwen3_moe"});

  make("no_config");
  fs::remove(path("no_config/config.json"));
  expect_convert_error("no_config", ErrorCode::format, {"config.json"});

  make("bad_config");
  std::ofstream(path("bad_config/config.json")) << "{\"model_type\": ";
  expect_convert_error("bad_config", ErrorCode::format, {"config.json", "not valid JSON"});

  fs::create_directories(path("empty"));
  expect_convert_error("empty", ErrorCode::format, {"config.json"});
  expect_convert_error("does_not_exist", ErrorCode::io, {"does_not_exist"});
}

// qwen3_next's head-grouped in_proj_qkvz / in_proj_ba become the flat projections Qwen3.5 ships, by row.
TEST_F(ConvertTest, Qwen3NextGroupedProjectionsAreRegroupedByRow) {
  const std::string fixture = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/qwen3_next";
  if (!fs::exists(fixture)) GTEST_SKIP() << "no parity fixtures";
  ConvertOptions o;
  o.hf_dir = fixture;
  o.pack_dir = path("next");
  o.progress = false;
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  auto pack = open_pack(path("next"));
  ASSERT_NE(pack, nullptr);
  auto source = SafetensorsFile::open(fixture + "/model.safetensors");
  ASSERT_TRUE(source.is_ok());
  // The fixture: 2 key heads of dk 12, 6 value heads of dv 16 (r = 3), hidden 64; per key head the
  // qkvz rows are q (12) | k (12) | v (48) | z (48), 120 rows, and the ba rows b (3) | a (3).
  const int64_t H = 64, group = 120;
  auto source_row = [&](const char* name, int64_t row) {
    auto raw = source->raw(std::string("model.layers.0.linear_attn.") + name);
    EXPECT_TRUE(raw.is_ok());
    return std::vector<uint8_t>(raw->begin() + row * H * 2, raw->begin() + (row + 1) * H * 2);
  };
  auto pack_row = [&](const char* name, int64_t row) {
    auto v = pack->resident(std::string("model.layers.0.linear_attn.") + name);
    EXPECT_TRUE(v.is_ok());
    EXPECT_EQ(v->format, WeightFormat::bf16);
    const auto* p = static_cast<const uint8_t*>(v->data) + row * H * 2;
    return std::vector<uint8_t>(p, p + H * 2);
  };
  // in_proj_qkv: [q of both heads (24) | k (24) | v (96)]
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 0), source_row("in_proj_qkvz.weight", 0));
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 12), source_row("in_proj_qkvz.weight", group));          // q of key head 1
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 24), source_row("in_proj_qkvz.weight", 12));             // k of key head 0
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 48 + 47), source_row("in_proj_qkvz.weight", 24 + 47));   // last v row of head 0
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 48 + 48), source_row("in_proj_qkvz.weight", group + 24));  // first v row of head 1
  EXPECT_EQ(pack_row("in_proj_z.weight", 0), source_row("in_proj_qkvz.weight", 72));
  EXPECT_EQ(pack_row("in_proj_z.weight", 50), source_row("in_proj_qkvz.weight", group + 72 + 2));
  EXPECT_EQ(pack_row("in_proj_b.weight", 4), source_row("in_proj_ba.weight", 6 + 1));  // value head 4 = key head 1, i = 1
  EXPECT_EQ(pack_row("in_proj_a.weight", 4), source_row("in_proj_ba.weight", 6 + 3 + 1));
  EXPECT_EQ(pack->manifest().find_tensor("model.layers.0.linear_attn.in_proj_qkvz.weight"), nullptr);
}

TEST_F(ConvertTest, RefusesHybridCheckpointsThatContradictTheConfig) {
  const std::string fixture = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/qwen3_next";
  if (!fs::exists(fixture)) GTEST_SKIP() << "no parity fixtures";
  auto copy = [&](const std::string& name) {
    fs::create_directories(path(name));
    for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(fixture + "/" + f, path(name + "/" + f));
  };
  auto edit_config = [&](const std::string& name, const std::function<void(json&)>& fn) {
    json config = json::parse(read_bytes(path(name + "/config.json")));
    fn(config);
    std::ofstream(path(name + "/config.json")) << config.dump();
  };
  copy("no_ba");
  edit_header(path("no_ba/model.safetensors"), [](json& h) { h.erase("model.layers.1.linear_attn.in_proj_ba.weight"); });
  expect_convert_error("no_ba", ErrorCode::format, {"model.layers.1.linear_attn.in_proj_ba.weight", "missing"});

  copy("qkvz_shape");
  edit_header(path("qkvz_shape/model.safetensors"), [](json& h) { h["model.layers.0.linear_attn.in_proj_qkvz.weight"]["shape"] = {64, 240}; });
  expect_convert_error("qkvz_shape", ErrorCode::mismatch, {"in_proj_qkvz", "[64, 240]", "expected [240, 64]"});

  copy("heads");
  edit_config("heads", [](json& c) { c["linear_num_value_heads"] = 5; });
  expect_convert_error("heads", ErrorCode::format, {"linear_num_value_heads 5", "multiple"});

  copy("layer_type");
  edit_config("layer_type", [](json& c) { c["layer_types"][1] = "sliding_attention"; });
  expect_convert_error("layer_type", ErrorCode::unsupported, {"sliding_attention"});

  copy("layer_count");
  edit_config("layer_count", [](json& c) { c["layer_types"].erase(0); });
  expect_convert_error("layer_count", ErrorCode::format, {"layer_types", "4 layers"});
}

TEST_F(ConvertTest, UnrepresentableValuesAreAnErrorNotACrash) {
  make("hf");
  uint64_t offset = 0;
  {
    auto file = SafetensorsFile::open(path("hf/model.safetensors"));
    ASSERT_TRUE(file.is_ok());
    offset = file->find("model.layers.0.self_attn.v_proj.weight")->offset;
  }
  {
    std::fstream f(path("hf/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(std::streamoff(offset + 2 * 70));
    f.put(char(0x80));
    f.put(char(0x7f));  // bf16 +inf at element 70 (row 1)
  }
  expect_error(convert("hf", "pack_q8", WeightFormat::q8, WeightFormat::q8), ErrorCode::format,
               {"model.layers.0.self_attn.v_proj.weight", "row 1"});
  EXPECT_FALSE(fs::exists(path("pack_q8")));
  EXPECT_TRUE(convert("hf", "pack_bf16").is_ok());  // bf16 stores inf as it is
}

TEST_F(ConvertTest, ExistingPackNeedsForce) {
  make("hf");
  ASSERT_TRUE(convert("hf", "pack").is_ok());
  const std::vector<uint8_t> manifest = read_bytes(path("pack/manifest.json"));
  expect_error(convert("hf", "pack", WeightFormat::q8), ErrorCode::invalid_argument, {"pack", "already exists", "--force"});
  EXPECT_EQ(read_bytes(path("pack/manifest.json")), manifest);  // untouched
  ASSERT_TRUE(convert("hf", "pack", WeightFormat::q8, WeightFormat::q8, true).is_ok());
  EXPECT_EQ(open_pack(path("pack"))->manifest().expert_format, WeightFormat::q8);

  // --force replaces packs, never another directory.
  fs::create_directories(path("precious"));
  std::ofstream(path("precious/notes.txt")) << "keep me";
  expect_error(convert("hf", "precious", WeightFormat::bf16, WeightFormat::bf16, true), ErrorCode::invalid_argument, {"not a moeflux pack"});
  EXPECT_TRUE(fs::exists(path("precious/notes.txt")));
  expect_error(convert("hf", "hf", WeightFormat::bf16, WeightFormat::bf16, true), ErrorCode::invalid_argument, {"checkpoint directory"});
  EXPECT_TRUE(fs::exists(path("hf/config.json")));
}

TEST_F(ConvertTest, ReportsProgress) {
  make("hf", {.n_shards = 2});
  int calls = 0;
  ConvertProgress last;
  ConvertOptions o;
  o.hf_dir = path("hf");
  o.pack_dir = path("pack");
  o.on_progress = [&](const ConvertProgress& p) {
    ++calls;
    EXPECT_LE(p.tensors_done, p.tensors_total);
    EXPECT_LE(p.bytes_done, p.bytes_total);
    last = p;
  };
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  EXPECT_GT(calls, 10);
  EXPECT_TRUE(last.finished);
  EXPECT_EQ(last.n_shards, 2);
  EXPECT_EQ(last.tensors_done, last.tensors_total);
  EXPECT_EQ(last.bytes_done, last.bytes_total);
}

// ---------------------------------------------------------------------------------------------------
// FP8 block-quantized checkpoints (DeepSeek-V3's published layout): F8_E4M3 matrices with
// "<name>_scale_inv" block scales.

// Blocks of [24, 40] divide none of the tiny model's dimensions (64, 128), so every matrix ends in
// partial blocks on both axes.
TinyCheckpointOptions fp8_options() {
  TinyCheckpointOptions o;
  o.fp8_block = {24, 40};
  return o;
}

// Overwrites bytes of a tensor's data in a safetensors file, at byte `at` of the tensor.
void overwrite_tensor_bytes(const std::string& file_path, const std::string& tensor, uint64_t at, const std::vector<uint8_t>& bytes) {
  uint64_t offset = 0;
  {
    auto file = SafetensorsFile::open(file_path);
    ASSERT_TRUE(file.is_ok()) << file.status().to_string();
    ASSERT_NE(file->find(tensor), nullptr) << tensor;
    offset = file->find(tensor)->offset;
  }
  std::fstream f(file_path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(std::streamoff(offset + at));
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// The pack's view of checkpoint tensor t (resident, or an expert matrix read into blob).
WeightView pack_view(const Pack& pack, const test::TestTensor& t, std::vector<uint8_t>& blob) {
  const std::string experts_marker = ".mlp.experts.";
  const auto pos = t.name.find(experts_marker);
  if (pos == std::string::npos) {
    auto view = pack.resident(t.name, t.shape);
    EXPECT_TRUE(view.is_ok()) << view.status().to_string();
    return view.is_ok() ? *view : WeightView{};
  }
  // model.layers.L.mlp.experts.E.part.weight
  const int layer = std::stoi(t.name.substr(std::string("model.layers.").size()));
  const std::string rest = t.name.substr(pos + experts_marker.size());
  const int64_t e = std::stoll(rest);
  const std::string part = rest.substr(rest.find('.') + 1, rest.rfind('.') - rest.find('.') - 1);
  const Manifest& m = pack.manifest();
  blob = read_bytes(pack.expert_file_path(layer), uint64_t(e) * m.expert_stride, m.expert_bytes);
  size_t index = 0;
  while (index < m.expert_matrices.size() && m.expert_matrices[index].part != part) ++index;
  EXPECT_LT(index, m.expert_matrices.size()) << part;
  return pack.expert_view(blob.data(), index);
}

TEST_F(ConvertTest, Fp8CheckpointsDequantizeExactlyIntoBf16) {
  // F32 scales over 4 shards (some scales in earlier, some in later shards than their weights), and
  // BF16 scales in one file.
  for (const char* scale_dtype : {"F32", "BF16"}) {
    TinyCheckpointOptions o = fp8_options();
    o.fp8_scale_dtype = scale_dtype;
    o.n_shards = std::string(scale_dtype) == "F32" ? 4 : 1;
    const std::string hf = fmt::format("hf_{}", scale_dtype), pack_dir = fmt::format("pack_{}", scale_dtype);
    const TinyCheckpoint ck = make(hf, o);
    auto index = scan_checkpoint_dir(path(hf));
    ASSERT_TRUE(index.is_ok()) << index.status().to_string();
    size_t fp8 = 0, scale_before = 0, scale_after = 0;
    for (const auto& t : ck.tensors) {
      if (t.dtype != "F8_E4M3") continue;
      ++fp8;
      const size_t weight_shard = index->tensor_shard.at(t.name), scale_shard = index->tensor_shard.at(t.name + "_scale_inv");
      scale_before += scale_shard < weight_shard ? 1 : 0;
      scale_after += scale_shard > weight_shard ? 1 : 0;
    }
    EXPECT_EQ(fp8, 3u * (4 + 8 * 3)) << scale_dtype;  // per layer q/k/v/o_proj and 8 experts × 3
    if (o.n_shards > 1) {
      EXPECT_GT(scale_before, 0u);
      EXPECT_GT(scale_after, 0u);
    }

    ConvertSummary summary;
    const Status s = convert(hf, pack_dir, WeightFormat::bf16, WeightFormat::bf16, false, &summary);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_TRUE(summary.extra_tensors.empty()) << summary.extra_tensors.size() << " skipped, e.g. " << summary.extra_tensors[0];
    EXPECT_EQ(summary.fp8_tensors, fp8);
    EXPECT_EQ(summary.source_bytes, index->tensor_bytes);  // every tensor's bytes counted once, scales included
    auto pack = open_pack(path(pack_dir));
    ASSERT_NE(pack, nullptr);
    size_t checked = 0, inexact = 0;
    for (const auto& t : ck.tensors) {
      if (t.name.ends_with("_scale_inv")) continue;
      ++checked;
      std::vector<uint8_t> blob;
      const WeightView v = pack_view(*pack, t, blob);
      const std::vector<float> expected = ck.values(t.name);
      ASSERT_EQ(size_t(v.rows * v.cols), expected.size()) << t.name;
      if (v.format == WeightFormat::f32) {  // norms: BF16 in the checkpoint, exact
        EXPECT_EQ(std::memcmp(v.data, expected.data(), expected.size() * 4), 0) << t.name;
        continue;
      }
      ASSERT_EQ(v.format, WeightFormat::bf16) << t.name;
      size_t mismatches = 0;
      for (size_t i = 0; i < expected.size(); ++i) {
        uint16_t stored;
        std::memcpy(&stored, static_cast<const uint8_t*>(v.data) + 2 * i, 2);
        mismatches += stored != f32_to_bf16(expected[i]) ? 1 : 0;
        inexact += bf16_to_f32(f32_to_bf16(expected[i])) != expected[i] ? 1 : 0;
      }
      EXPECT_EQ(mismatches, 0u) << t.name << " (" << t.dtype << ")";
    }
    EXPECT_EQ(summary.checkpoint_tensors, checked);
    // The dequantized values are not bf16 already, so the bf16 rounding of each product is checked too.
    EXPECT_GT(inexact, 1000u) << scale_dtype;
  }
}

TEST_F(ConvertTest, Fp8CheckpointsStayWithinTheQuantizationBound) {
  const TinyCheckpoint ck = make("hf", fp8_options());
  // Through the CLI: no flag says FP8, the dtypes do; q4 experts and q8 dense matrices.
  test::CliResult r = test::run_cli(fmt::format("convert '{}' '{}' --quant q4", path("hf"), path("pack")), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("84 F8_E4M3 tensors dequantized"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("skipped"), std::string::npos) << r.out;  // the scales are consumed, not unused
  EXPECT_EQ(r.err.find("skipping"), std::string::npos) << r.err;
  auto pack = open_pack(path("pack"));
  ASSERT_NE(pack, nullptr);
  for (const char* name : {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                           "model.layers.2.self_attn.v_proj.weight", "model.layers.0.mlp.experts.5.down_proj.weight",
                           "model.layers.2.mlp.experts.7.gate_proj.weight", "model.embed_tokens.weight"}) {
    const test::TestTensor* t = ck.find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->dtype, std::string(std::string(name) == "model.embed_tokens.weight" ? "BF16" : "F8_E4M3")) << name;
    std::vector<uint8_t> blob;
    const WeightView v = pack_view(*pack, *t, blob);
    EXPECT_EQ(v.format, std::string(name).find(".experts.") != std::string::npos ? WeightFormat::q4 : WeightFormat::q8) << name;
    expect_within_quant_bound(v, ck.values(name), name);
  }
}

// qwen3_next builds in_proj_qkv/z/b/a from rows of in_proj_qkvz/ba: an FP8 source is dequantized whole,
// then its rows are selected.
TEST_F(ConvertTest, Fp8SourcesOfRowSelectionsAreDequantizedFirst) {
  const std::string fixture = std::string(MOEFLUX_FIXTURE_DIR) + "/parity/qwen3_next";
  if (!fs::exists(fixture)) GTEST_SKIP() << "no parity fixtures";
  const std::vector<int64_t> block = {24, 40};
  std::map<std::string, std::pair<test::TestTensor, test::TestTensor>> quantized;  // by name: weight, scales
  {
    auto source = SafetensorsFile::open(fixture + "/model.safetensors");
    ASSERT_TRUE(source.is_ok());
    std::vector<test::TestTensor> tensors;
    for (const auto& st : source->tensors()) {
      const std::span<const uint8_t> raw = source->raw(st);
      test::TestTensor t{st.name, safetensors_dtype_name(st.dtype), st.shape, std::vector<uint8_t>(raw.begin(), raw.end())};
      if (!st.name.ends_with("in_proj_qkvz.weight") && !st.name.ends_with("in_proj_ba.weight")) {
        tensors.push_back(std::move(t));
        continue;
      }
      auto q = test::quantize_fp8(t, block);
      tensors.push_back(q.first);
      tensors.push_back(q.second);
      quantized.emplace(st.name, std::move(q));
    }
    fs::create_directories(path("hf"));
    ASSERT_TRUE(test::write_safetensors(path("hf/model.safetensors"), tensors).is_ok());
    json config = json::parse(read_bytes(fixture + "/config.json"));
    config["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", block}};
    std::ofstream(path("hf/config.json")) << config.dump();
  }
  ASSERT_EQ(quantized.size(), 6u);  // three linear-attention layers
  ConvertSummary summary;
  const Status s = convert("hf", "pack", WeightFormat::bf16, WeightFormat::bf16, false, &summary);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(summary.fp8_tensors, 6u);
  EXPECT_TRUE(summary.extra_tensors.empty());
  auto pack = open_pack(path("pack"));
  ASSERT_NE(pack, nullptr);
  const int64_t H = 64, group = 120;  // the row layout of Qwen3NextGroupedProjectionsAreRegroupedByRow
  auto source_row = [&](const std::string& name, int64_t row) {
    const auto& [w, scales] = quantized.at("model.layers.0.linear_attn." + name);
    const std::vector<float> values = test::tensor_values(w, &scales, block);
    std::vector<uint16_t> bits;
    for (int64_t c = 0; c < H; ++c) bits.push_back(f32_to_bf16(values[size_t(row * H + c)]));
    return bits;
  };
  auto pack_row = [&](const std::string& name, int64_t row) {
    auto v = pack->resident("model.layers.0.linear_attn." + name);
    EXPECT_TRUE(v.is_ok());
    std::vector<uint16_t> bits(static_cast<size_t>(H));
    std::memcpy(bits.data(), static_cast<const uint8_t*>(v->data) + row * H * 2, size_t(H) * 2);
    return bits;
  };
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 0), source_row("in_proj_qkvz.weight", 0));
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 12), source_row("in_proj_qkvz.weight", group));       // in the source's 6th row block
  EXPECT_EQ(pack_row("in_proj_qkv.weight", 48 + 47), source_row("in_proj_qkvz.weight", 24 + 47));
  EXPECT_EQ(pack_row("in_proj_z.weight", 50), source_row("in_proj_qkvz.weight", group + 72 + 2));  // the last, partial block
  EXPECT_EQ(pack_row("in_proj_b.weight", 4), source_row("in_proj_ba.weight", 6 + 1));
  EXPECT_EQ(pack_row("in_proj_a.weight", 4), source_row("in_proj_ba.weight", 6 + 3 + 1));

  // A NaN anywhere in the source is found, by its row in the source.
  overwrite_tensor_bytes(path("hf/model.safetensors"), "model.layers.1.linear_attn.in_proj_qkvz.weight", 130 * H + 9, {0xff});
  expect_convert_error("hf", ErrorCode::format, {"model.layers.1.linear_attn.in_proj_qkvz.weight", "row 130", "NaN"});
}

TEST_F(ConvertTest, RefusesBrokenFp8Checkpoints) {
  const TinyCheckpointOptions o = fp8_options();
  const std::string k = "model.layers.1.self_attn.k_proj.weight";  // [64, 64]: scales [3, 2]
  const std::string k_scale = k + "_scale_inv";

  make("no_scale", o);
  edit_header(path("no_scale/model.safetensors"), [&](json& h) { h.erase(k_scale); });
  expect_convert_error("no_scale", ErrorCode::format, {k, k_scale, "missing"});

  make("scale_shape", o);
  edit_header(path("scale_shape/model.safetensors"), [&](json& h) { h[k_scale]["shape"] = {2, 3}; });
  expect_convert_error("scale_shape", ErrorCode::mismatch, {k_scale, "[2, 3]", "expected [3, 2]", "[24, 40]"});

  make("scale_dtype", o);
  edit_header(path("scale_dtype/model.safetensors"), [&](json& h) { h[k_scale]["dtype"] = "I32"; });
  expect_convert_error("scale_dtype", ErrorCode::unsupported, {k_scale, "I32", "F32"});

  make("e5m2", o);
  edit_header(path("e5m2/model.safetensors"), [&](json& h) { h[k]["dtype"] = "F8_E5M2"; });
  expect_convert_error("e5m2", ErrorCode::unsupported, {k, "F8_E5M2"});

  int variant = 0;
  for (const json& bad : {json::array({0, 128}), json::array({128}), json::array({128, 12.5}), json("128x128")}) {
    const std::string name = fmt::format("block_{}", variant++);
    make(name, o);
    json config = json::parse(read_bytes(path(name + "/config.json")));
    config["quantization_config"]["weight_block_size"] = bad;
    std::ofstream(path(name + "/config.json")) << config.dump();
    expect_convert_error(name, ErrorCode::format, {"config.json", "weight_block_size", bad.dump(), "two positive integers", "F8_E4M3 tensor model.layers."});
  }

  make("method", o);
  {
    json config = json::parse(read_bytes(path("method/config.json")));
    config["quantization_config"]["quant_method"] = "compressed-tensors";
    std::ofstream(path("method/config.json")) << config.dump();
  }
  expect_convert_error("method", ErrorCode::unsupported, {"quant_method", "compressed-tensors"});

  TinyCheckpointOptions fused = o;
  fused.fused_experts = true;
  make("fused", fused);
  expect_convert_error("fused", ErrorCode::unsupported, {"model.layers.0.mlp.experts.gate_up_proj", "F8_E4M3", "fused"});

  // A NaN is found by tensor and row, in an expert matrix and in a resident one, whatever the format.
  const std::string down = "model.layers.1.mlp.experts.3.down_proj.weight";  // [64, 64]
  make("nan_expert", o);
  overwrite_tensor_bytes(path("nan_expert/model.safetensors"), down, 5 * 64 + 7, {0x7f});
  expect_convert_error("nan_expert", ErrorCode::format, {down, "row 5", "NaN"});
  const std::string q = "model.layers.2.self_attn.q_proj.weight";  // [128, 64]
  make("nan_resident", o);
  overwrite_tensor_bytes(path("nan_resident/model.safetensors"), q, 100 * 64, {0xff});
  expect_error(convert("nan_resident", "bad_pack", WeightFormat::q8, WeightFormat::q8), ErrorCode::format, {q, "row 100", "NaN"});
  EXPECT_FALSE(fs::exists(path("bad_pack")));
  EXPECT_FALSE(fs::exists(path("bad_pack.partial")));

  // A scale that is not finite would turn a whole block into inf or NaN.
  make("inf_scale", o);
  const float inf = INFINITY;
  std::vector<uint8_t> inf_bytes(4);
  std::memcpy(inf_bytes.data(), &inf, 4);
  overwrite_tensor_bytes(path("inf_scale/model.safetensors"), k_scale, 4 * (2 * 2 + 1), inf_bytes);
  expect_convert_error("inf_scale", ErrorCode::format, {k_scale, "block [2, 1]", "finite"});
}

// ---------------------------------------------------------------------------------------------------
// A damaged pack is refused at open.

class DamagedPackTest : public ConvertTest {
 protected:
  void SetUp() override {
    ConvertTest::SetUp();
    make("hf");
    ASSERT_TRUE(convert("hf", "pack").is_ok());
  }
  void expect_open_error(const std::vector<std::string>& fragments) {
    auto pack = Pack::open(path("pack"));
    ASSERT_FALSE(pack.is_ok());
    expect_error(pack.status(), ErrorCode::format, fragments);
  }
};

TEST_F(DamagedPackTest, TruncatedResident) {
  fs::resize_file(path("pack/resident.bin"), fs::file_size(path("pack/resident.bin")) - 4096);
  expect_open_error({"resident.bin", "expected"});
}

TEST_F(DamagedPackTest, CorruptManifest) {
  fs::resize_file(path("pack/manifest.json"), fs::file_size(path("pack/manifest.json")) / 2);
  expect_open_error({"manifest.json", "not valid JSON"});
}

TEST_F(DamagedPackTest, ManifestWithAMissingField) {
  json j = json::parse(read_bytes(path("pack/manifest.json")));
  j["experts"].erase("stride");
  std::ofstream(path("pack/manifest.json")) << j.dump();
  expect_open_error({"stride"});
}

TEST_F(DamagedPackTest, FlippedByteInResident) {
  {
    std::fstream f(path("pack/resident.bin"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(100);
    const char c = char(f.get());
    f.seekp(100);
    f.put(char(c ^ 0x10));
  }
  expect_open_error({"resident.bin", "corrupt"});
}

TEST_F(DamagedPackTest, TruncatedExpertFile) {
  fs::resize_file(path("pack/experts/layer_001.bin"), fs::file_size(path("pack/experts/layer_001.bin")) - 1);
  expect_open_error({"layer_001.bin"});
}

// ---------------------------------------------------------------------------------------------------
// The CLI

using test::CliResult;
using test::run_cli;

TEST_F(ConvertTest, CliConvertsInspectsAndVerifies) {
  make("hf");
  CliResult r = run_cli(fmt::format("convert '{}' '{}' --quant q4 --quiet", path("hf"), path("pack")), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli(fmt::format("inspect '{}' --verify --json --tensors", path("pack")), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["model_type"], "qwen3_moe");
  EXPECT_EQ(j["quant"]["experts"], "q4");
  EXPECT_EQ(j["quant"]["dense"], "q8");  // the default dense format under q4 experts
  EXPECT_EQ(j["verify"]["ok"], true);
  EXPECT_EQ(j["experts"]["n_expert"], 8);
  EXPECT_FALSE(j["tensors"].empty());

  r = run_cli(fmt::format("inspect '{}'", path("pack")), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("qwen3_moe"), std::string::npos);
  EXPECT_NE(r.out.find("experts/layer_002.bin"), std::string::npos);

  // One flipped byte in one expert blob: --verify names the file and the expert.
  const uint64_t stride = j["experts"]["stride"];
  {
    std::fstream f(path("pack/experts/layer_001.bin"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(std::streamoff(3 * stride + 10));
    f.put(char(0x5a));
  }
  r = run_cli(fmt::format("inspect '{}' --verify", path("pack")), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("experts/layer_001.bin: expert 3"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 hash mismatch"), std::string::npos) << r.err;
}

TEST_F(ConvertTest, CliReportsBadInput) {
  make("hf");
  edit_header(path("hf/model.safetensors"), [](json& h) { h["model.layers.0.self_attn.q_proj.weight"]["shape"] = {64, 128}; });
  CliResult r = run_cli(fmt::format("convert '{}' '{}' --quant bf16", path("hf"), path("pack")), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.err.rfind("moeflux convert: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find("model.layers.0.self_attn.q_proj.weight"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(path("pack")));

  r = run_cli("convert", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE((r.out + r.err).find("hf_dir"), std::string::npos) << r.out << r.err;

  r = run_cli(fmt::format("convert '{}' '{}' --quant q3", path("hf"), path("pack")), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE((r.out + r.err).find("q3"), std::string::npos) << r.out << r.err;

  r = run_cli(fmt::format("inspect '{}'", path("nothing_here")), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.err.rfind("moeflux inspect: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find("nothing_here"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moeflux
