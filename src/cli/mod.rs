//! Command line: `serve`, `bootstrap` and (later) client subcommands.

pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
