// PLACEHOLDER until the convert command lands.
#include "commands.hpp"
namespace moeflux::cli {
void register_convert(CLI::App& app, Action& action) {
  auto* sub = app.add_subcommand("convert", "(not yet implemented)");
  sub->callback([&action] { action = [] { std::fprintf(stderr, "moeflux convert: not implemented\n"); return 1; }; });
}
}  // namespace moeflux::cli
