// `moeflux convert`: Hugging Face checkpoint directory → pack (src/format/convert.hpp does the work;
// this file owns the flags, the default dense format and the summary printed at the end).
#include <cstdio>

#include "commands.hpp"
#include "format/convert.hpp"
#include "model_flags.hpp"

namespace moeflux::cli {
namespace {

struct ConvertArgs {
  std::string hf_dir;
  std::string pack_dir;
  std::string quant;
  std::string dense_quant;  // empty: bf16 when quant is bf16, else q8
  bool force = false;
  bool quiet = false;
  int n_threads = 0;
};

int run_convert(const ConvertArgs& a) {
  ConvertOptions o;
  o.hf_dir = a.hf_dir;
  o.pack_dir = a.pack_dir;
  o.expert_format = *parse_weight_format(a.quant);  // CLI11 checked the value
  // q8 dense under q4 experts: the resident part is a few percent of the bytes but is read for every
  // token, and q4 on attention costs more quality than it saves.
  o.dense_format = !a.dense_quant.empty()        ? *parse_weight_format(a.dense_quant)
                   : o.expert_format == WeightFormat::bf16 ? WeightFormat::bf16
                                                           : WeightFormat::q8;
  o.overwrite = a.force;
  o.progress = !a.quiet;
  o.n_threads = a.n_threads;
  ConvertSummary s;
  const Status status = convert_checkpoint(o, &s);
  if (!status.is_ok()) return report_error("convert", status);
  if (a.quiet) return 0;
  std::printf("converted %s checkpoint %s -> %s in %.1f s (%s/s)\n", s.model_type.c_str(), a.hf_dir.c_str(), a.pack_dir.c_str(),
              s.seconds, format_bytes(s.seconds > 0 ? double(s.source_bytes) / s.seconds : 0).c_str());
  std::printf("  tensors    %zu read from the checkpoint (%s), %zu resident in the pack\n", s.checkpoint_tensors,
              format_bytes(double(s.source_bytes)).c_str(), s.resident_tensors);
  if (s.fp8_tensors > 0)
    std::printf("  fp8        %zu F8_E4M3 tensors dequantized with their block scales (_scale_inv)\n", s.fp8_tensors);
  std::printf("  resident   %s in resident.bin (matrices %s, norms f32, routers bf16%s)\n", format_bytes(double(s.resident_bytes)).c_str(),
              weight_format_name(o.dense_format),
              s.fallback_tensors.empty() ? "" : fmt::format("; {} fell back to bf16", s.fallback_tensors.size()).c_str());
  if (s.n_expert_layers > 0)
    std::printf("  experts    %zu layers x %lld experts x stride %llu B = %s (%s, %llu meaningful bytes per expert)\n", s.n_expert_layers,
                (long long)s.n_expert, (unsigned long long)s.expert_stride, format_bytes(double(s.expert_file_bytes)).c_str(),
                weight_format_name(o.expert_format), (unsigned long long)s.expert_blob_bytes);
  if (!s.tokenizer_files.empty()) std::printf("  tokenizer  %s\n", fmt::format("{}", fmt::join(s.tokenizer_files, ", ")).c_str());
  if (!s.extra_tensors.empty()) std::printf("  skipped    %zu checkpoint tensors the model does not use\n", s.extra_tensors.size());
  return 0;
}

}  // namespace

void register_convert(CLI::App& app, Action& action) {
  auto args = std::make_shared<ConvertArgs>();
  auto* sub = app.add_subcommand("convert", "convert a Hugging Face checkpoint (config.json + *.safetensors) into a moeflux pack");
  sub->add_option("hf_dir", args->hf_dir, "checkpoint directory")->required();
  sub->add_option("pack_dir", args->pack_dir, "pack directory to create (written as <pack_dir>.partial, renamed at the end)")->required();
  const auto formats = CLI::IsMember({"bf16", "q8", "q4"});
  sub->add_option("--quant", args->quant, "format of the routed experts: bf16, q8 (int8, groups of 32) or q4 (4-bit affine, groups of 64)")
      ->required()
      ->check(formats);
  sub->add_option("--dense-quant", args->dense_quant,
                  "format of the resident matrices and the embedding: bf16, q8 or q4 (default: bf16 when --quant is bf16, else q8). "
                  "Norms stay f32 and routers bf16; a matrix whose column count is not a multiple of the group falls back to bf16")
      ->check(formats);
  sub->add_flag("--force", args->force, "replace an existing pack at pack_dir");
  sub->add_flag("--quiet,-q", args->quiet, "no progress, warnings or summary");
  sub->add_option("--threads", args->n_threads, "quantization threads (default: every hardware thread)")->check(CLI::NonNegativeNumber);
  sub->callback([args, &action] { action = [args] { return run_convert(*args); }; });
}

}  // namespace moeflux::cli
