#pragma once
// The subcommands of `vitlab`: each function registers one on the app, with
// its options and help, and returns what runs it (cli/<subcommand>.cpp).
#include <CLI/CLI.hpp>

#include "cli/common.h"

namespace vitlab::cli {

Command add_models_command(CLI::App& app, CommonOptions& common);
Command add_info_command(CLI::App& app, CommonOptions& common);
Command add_forward_command(CLI::App& app, CommonOptions& common);
Command add_convert_command(CLI::App& app, CommonOptions& common);
Command add_compare_command(CLI::App& app, CommonOptions& common);
Command add_data_command(CLI::App& app, CommonOptions& common);  // `data export`
Command add_train_command(CLI::App& app, CommonOptions& common);
Command add_eval_command(CLI::App& app, CommonOptions& common);
Command add_analyze_command(CLI::App& app, CommonOptions& common);
Command add_study_command(CLI::App& app, CommonOptions& common);
Command add_bench_command(CLI::App& app, CommonOptions& common);
Command add_launch_command(CLI::App& app);

}  // namespace vitlab::cli
