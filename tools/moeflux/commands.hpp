// The CLI's subcommands. Each tools/moeflux/cmd_*.cpp adds one subcommand to the app; main.cpp calls
// every register_* and runs the chosen one. A command returns the process exit code.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace moeflux::cli {

// The subcommand's action, run after parsing; returns the exit code.
using Action = std::function<int()>;

void register_convert(CLI::App& app, Action& action);
void register_inspect(CLI::App& app, Action& action);
void register_logits(CLI::App& app, Action& action);
void register_run(CLI::App& app, Action& action);
void register_chat(CLI::App& app, Action& action);
void register_tokenize(CLI::App& app, Action& action);
void register_template(CLI::App& app, Action& action);
void register_perplexity(CLI::App& app, Action& action);
void register_synth(CLI::App& app, Action& action);
void register_bench(CLI::App& app, Action& action);

}  // namespace moeflux::cli
