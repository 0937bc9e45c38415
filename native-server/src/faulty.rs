//! `server-faulty`: `server` with the test-only flags that make it lie (cargo feature
//! `fault-injection`), for the tests of what clients check. Never shipped.

fn main() -> std::process::ExitCode {
    corolla_server::entry::main()
}
