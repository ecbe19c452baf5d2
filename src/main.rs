#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    instance_manager::cli::main()
}
