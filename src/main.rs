//! Picks the face of the binary: CNI plugin when `CNI_COMMAND` is set, operator CLI otherwise.

fn main() {
    let code = if std::env::var_os("CNI_COMMAND").is_some() {
        pontoon::cli::cni_main()
    } else {
        pontoon::cli::operator_main()
    };
    std::process::exit(code);
}
