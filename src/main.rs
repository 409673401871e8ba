//! The `weightvault` binary: all behaviour lives in the library (`weightvault::cli`).

fn main() -> std::process::ExitCode {
    weightvault::cli::main()
}
