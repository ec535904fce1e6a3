//! Picks the face of the binary: the CNI plugin or the operator CLI.

fn main() {
    let code = if cni_mode() {
        pontoon::cli::cni_main()
    } else {
        pontoon::cli::operator_main()
    };
    std::process::exit(code);
}

/// A runtime calls the plugin with `CNI_COMMAND` set. Without it, a call with no arguments that
/// still looks like a runtime's (another `CNI_*` variable set, or a config piped on stdin) gets
/// a plugin's answer (error code 4, "CNI_COMMAND is required") rather than the CLI's usage text;
/// a person at a terminal, or any call with arguments, gets the operator CLI.
fn cni_mode() -> bool {
    use std::io::IsTerminal;
    if std::env::var_os("CNI_COMMAND").is_some() {
        return true;
    }
    if std::env::args_os().len() > 1 {
        return false;
    }
    let runtime_env = [
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some());
    runtime_env || !std::io::stdin().is_terminal()
}
