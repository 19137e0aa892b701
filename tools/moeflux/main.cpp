// moeflux: the command-line interface. Subcommands live in cmd_*.cpp (see commands.hpp).
#include <cstdio>

#include "commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moeflux: run Mixture-of-Experts models larger than memory, experts streamed from storage"};
  app.require_subcommand(1);
  // Bad arguments print the (sub)command's usage, not just the error.
  app.failure_message(CLI::FailureMessage::help);
  app.set_version_flag("--version", "moeflux 0.1.0");
  moeflux::cli::Action action;
  moeflux::cli::register_convert(app, action);
  moeflux::cli::register_inspect(app, action);
  moeflux::cli::register_logits(app, action);
  moeflux::cli::register_run(app, action);
  moeflux::cli::register_chat(app, action);
  moeflux::cli::register_tokenize(app, action);
  moeflux::cli::register_template(app, action);
  moeflux::cli::register_perplexity(app, action);
  moeflux::cli::register_synth(app, action);
  moeflux::cli::register_bench(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Usage on bad arguments, exit code non-zero (CLI11 returns 0 for --help / --version).
    return app.exit(e);
  }
  if (!action) {
    std::fprintf(stderr, "moeflux: no command\n");
    return 2;
  }
  return action();
}
