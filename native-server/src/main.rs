//! `server`: hosts a span of transformer blocks for the Corolla swarm.

fn main() -> std::process::ExitCode {
    corolla_server::entry::main()
}
