fn main() -> std::process::ExitCode {
    pretext::cli::main()
}
